"""Flower's entry point for the ClientApp: the installed fedspine's, at the site."""

from fedspine.federated.client_app import app

__all__ = ["app"]
