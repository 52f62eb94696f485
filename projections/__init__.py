"""Read models: one module per view, holding its tables, its event handlers and its queries."""
