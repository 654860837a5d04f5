"""Runnable experiments: ``python -m examples.vtab`` and ``python -m examples.commonsense``."""
