"""Distillation losses: pure functions (``functional``) and one thin module per method.

Importing this package registers every method: ``ce``, ``kd``, ``dkd``, ``dtkd``, ``dtkd_dkd``,
``deepkd`` and its aliases ``deepkd_kd``, ``deepkd_dkd``, ``deepkd_dtkd``, and the two-view methods
(``views = 2``: logits ``[2, B, C]``, weak and strong view) ``mlkd``, ``deepkd_mlkd``, ``crld`` and
``deepkd_crld``, and the feature methods of ``deepkd.losses.feature`` (``fitnet``, ...).
"""
from deepkd.losses import functional
from deepkd.losses.base import STREAMS, LossTerm, Method, stream_losses, total_loss, warmup_factor
from deepkd.losses.ce import CrossEntropy
from deepkd.losses.crld import CRLD, DeepKDCRLD
from deepkd.losses.ctkd import CTKD
from deepkd.losses.deepkd import DeepKDKD, deepkd
from deepkd.losses.dkd import DKD
from deepkd.losses.dtkd import DTKD
from deepkd.losses.dtkd_dkd import DTKDDKD
from deepkd.losses.feature import FitNet
from deepkd.losses.kd import KD
from deepkd.losses.mlkd import MLKD, DeepKDMLKD
from deepkd.losses.registry import METHODS, build_method, list_methods, register_method

__all__ = ["STREAMS", "LossTerm", "Method", "stream_losses", "total_loss", "warmup_factor",
           "functional", "CrossEntropy", "KD", "DKD", "DTKD", "DTKDDKD", "DeepKDKD", "deepkd",
           "MLKD", "DeepKDMLKD", "CRLD", "DeepKDCRLD", "CTKD", "FitNet",
           "METHODS", "build_method", "list_methods", "register_method"]
