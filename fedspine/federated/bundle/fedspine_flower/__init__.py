"""Shim package of the Flower app bundle; everything lives in the installed fedspine."""
