"""Edges to the outside world: ledger (eventsourcing on Postgres), bus (NATS JetStream), relay,
projector runner, Postgres pools. Each implements a port from domain/ or serves projections/."""
