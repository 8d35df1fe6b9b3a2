"""Feature-distillation methods (``Method.features = True``): each reads the student's and the
teacher's :class:`~deepkd.models.features.Features`. Importing this package registers them."""
from deepkd.losses.feature.fitnet import FitNet

__all__ = ["FitNet"]
