"""Composition root: settings from the environment, embedded servers, process roles, CLI."""
