"""loraq: compress, then adapt.

Binarize (int1) or 1:16 block-sparsify (sparse4x4) the ``nn.Linear`` layers of a model, win the
lost accuracy back with LoRA adapters trained on the frozen compressed base, and run it through
fused kernels. ``import loraq`` never needs a GPU, Triton or the compiled extension.
"""

from ._version import __version__
from .api import CompressionConfig, CompressionReport, Footprint, compress_, footprint
from .checkpoint import CheckpointError, load, save
from .formats import DenseWeight, Int1Weight, Sparse4x4Weight
from .nn import LoraLinear
from .ops import lora_linear
from .train import TrainConfig, train
from .evaluate import evaluate
from .sweep import SweepConfig, sweep
from .demo import demo

__all__ = [
    "__version__", "CompressionConfig", "CompressionReport", "Footprint", "compress_", "footprint",
    "CheckpointError", "load", "save", "DenseWeight", "Int1Weight", "Sparse4x4Weight", "LoraLinear",
    "lora_linear", "TrainConfig", "train", "evaluate", "SweepConfig", "sweep", "demo",
]
