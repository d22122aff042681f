"""Shared plumbing for the paper scripts: models, sampling, rewards, data, logging, tools, caching."""
