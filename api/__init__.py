"""The HTTP API (Litestar + msgspec): parse, authorise, call a domain service or a projection
query, map errors to problem+json in one place. Adapters arrive injected through ApiDeps."""
