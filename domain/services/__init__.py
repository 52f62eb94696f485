"""The application layer: one module per capability, each use case a method over ports
(domain/ports.py) that gets aggregates from the ledger, lets them decide, and saves them.

- base: `Written` (what a command wrote) and the bounded retry after a lost race;
- organisations, catalogue (meters, projects), access (API keys, admin tokens), plans,
  invoicing (draft, finalize, void);
- invoice_runs: the invoice run's decisions as pure functions (adapters/invoice_run.py reads,
  locks and drafts with them).

Aggregates and the rest of domain/ never import this package (an import-linter contract)."""
