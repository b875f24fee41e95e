"""dst package."""
