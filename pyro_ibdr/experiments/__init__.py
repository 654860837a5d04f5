"""The experiment side of pyro_ibdr: offline assets, VTAB-1k and commonsense data, timm and transformers
backbones, the resumable grid runner, reports and plots, and the ``pyro-ibdr`` command line.

Nothing here is imported by ``import pyro_ibdr``: the core (model, guides, losses, methods, posteriors,
predictive, metrics, fit) stays light.
"""
