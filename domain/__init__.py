"""The pure business model: aggregates, domain events, commands, rules and ports.

Nothing here does I/O; clocks and ids are passed in by the caller.
"""
