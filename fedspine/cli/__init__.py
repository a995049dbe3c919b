"""fedspine.cli."""
