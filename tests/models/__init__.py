"""Tests of fedspine.models."""
