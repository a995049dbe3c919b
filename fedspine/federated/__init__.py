"""fedspine.federated."""
