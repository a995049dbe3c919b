"""fedspine: federated, differentially private synthetic spine radiographs."""

__version__ = "0.1.0"
