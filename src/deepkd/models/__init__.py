"""Model zoo: CIFAR-100 and ImageNet architectures of the papers, plus small demo CNNs."""
from deepkd.models import cifar_mobile, cifar_resnet, cifar_wrn_vgg, imagenet, tiny  # noqa: F401  (registration)
from deepkd.models.registry import (MODELS, create_model, format_model_table, list_models, model_info,
                                    register_model)
from deepkd.models.weights import count_parameters, extract_state_dict, load_weights, save_weights

__all__ = ["MODELS", "count_parameters", "create_model", "extract_state_dict", "format_model_table",
           "list_models", "load_weights", "model_info", "register_model", "save_weights"]
