"""fedspine.data."""
