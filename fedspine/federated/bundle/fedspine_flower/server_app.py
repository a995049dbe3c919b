"""Flower's entry point for the ServerApp: the installed fedspine's."""

from fedspine.federated.server_app import app

__all__ = ["app"]
