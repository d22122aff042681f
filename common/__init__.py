"""Shared plumbing for the paper scripts: models, sampling, rewards, tasks, data, logging, tools."""
