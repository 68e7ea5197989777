"""loftq plugin (being written)."""
