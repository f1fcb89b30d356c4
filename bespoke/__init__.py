"""bespoke: make a pretrained network fast on many target devices at low cost.

The public types for plugins and embedding applications are re-exported here; plugins import
from :mod:`bespoke.api`, which also holds the helpers they need.
"""

from bespoke.errors import BespokeError, NotImplementedYet, UsageError
from bespoke.hookspecs import hookimpl
from bespoke.types import (
    AlternativeSpec,
    BlockContext,
    BlockSource,
    Candidate,
    DeviceInfo,
    DistillLoss,
    LatencyEstimator,
    LatencyQuery,
    PluginOptions,
    PluginRecord,
    SearchProblem,
    SearchStrategy,
    SegmentInfo,
    Solution,
)

__version__ = "0.1.0"


def load_student(path):
    """Reload a student saved by bespoke (recipe JSON + safetensors) as an ``nn.Module``."""
    from bespoke.student import load_student as _load

    return _load(path)


__all__ = [
    "AlternativeSpec", "BespokeError", "BlockContext", "BlockSource", "Candidate", "DeviceInfo",
    "DistillLoss", "LatencyEstimator", "LatencyQuery", "NotImplementedYet", "PluginOptions",
    "PluginRecord", "SearchProblem", "SearchStrategy", "SegmentInfo", "Solution", "UsageError",
    "hookimpl", "load_student", "__version__",
]
