"""pyro_ibdr: Interactive Bayesian Distributional Robustness for LoRA fine-tuning, with Pyro."""
