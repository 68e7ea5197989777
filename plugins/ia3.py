"""ia3 plugin (being written)."""
