"""Feature-distillation methods (``Method.features = True``): each reads the student's and the
teacher's :class:`~deepkd.features.Features`. Importing this package registers them (one import
line per method file)."""
from deepkd.losses.feature.fitnet import FitNet  # noqa: F401
