"""Model zoo: deepkd's CIFAR-100 architectures and MobileNetV1, torchvision's and timm's models, demo CNNs."""
from deepkd.models import cifar_mobile, cifar_resnet, cifar_wrn_vgg, ecosystem, mobilenetv1, tiny  # noqa: F401  (registration)
from deepkd.models.ecosystem import load_pretrained
from deepkd.models.features import FeatureExtractor, FeatureInfo, Features, feature_info
from deepkd.models.registry import MODELS, create_model, format_model_table, list_models, model_info, register_model
from deepkd.models.weights import count_parameters, extract_state_dict, load_weights, read_weights, save_weights

__all__ = ["MODELS", "FeatureExtractor", "FeatureInfo", "Features", "count_parameters", "create_model",
           "extract_state_dict", "feature_info", "format_model_table", "list_models", "load_pretrained",
           "load_weights", "model_info", "read_weights", "register_model", "save_weights"]
