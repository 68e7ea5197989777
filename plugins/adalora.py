"""adalora plugin (being written)."""
