"""vera plugin (being written)."""
