"""galore plugin (being written)."""
