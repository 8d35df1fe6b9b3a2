"""Feature-distillation methods (``Method.features = True``): each reads the student's and the
teacher's :class:`~deepkd.features.Features`. Importing this package registers them (one import
line per method file)."""
from deepkd.losses.feature.at import AT  # noqa: F401
from deepkd.losses.feature.crd import CRD  # noqa: F401
from deepkd.losses.feature.fitnet import FitNet  # noqa: F401
from deepkd.losses.feature.kdsvd import KDSVD  # noqa: F401
from deepkd.losses.feature.nst import NST  # noqa: F401
from deepkd.losses.feature.ofd import OFD  # noqa: F401
from deepkd.losses.feature.pkt import PKT  # noqa: F401
from deepkd.losses.feature.reviewkd import ReviewKD  # noqa: F401
from deepkd.losses.feature.rkd import RKD  # noqa: F401
from deepkd.losses.feature.sp import SP  # noqa: F401
from deepkd.losses.feature.vid import VID  # noqa: F401
