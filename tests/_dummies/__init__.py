"""Tiny models and small real data for fast CPU tests."""
