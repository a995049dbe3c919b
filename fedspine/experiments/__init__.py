"""fedspine.experiments."""
