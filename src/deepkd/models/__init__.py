"""Model zoo: CIFAR-100 and ImageNet architectures of the papers, plus small demo CNNs."""
from deepkd.models import tiny  # noqa: F401  (registers cnn_w*)
from deepkd.models.registry import MODELS, create_model, list_models, model_info, register_model

__all__ = ["MODELS", "create_model", "list_models", "model_info", "register_model"]
