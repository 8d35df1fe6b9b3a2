"""deepkd: logit knowledge distillation (KD, DKD, DTKD, DeepKD) for PyTorch."""

__version__ = "0.1.0"
