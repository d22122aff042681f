"""The worlds the papers run in at the CPU scale: synthetic tasks and environments, and the builders of their
tiny base models."""
