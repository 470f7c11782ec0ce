"""Built-in tasks that the project generates itself (no downloads)."""
