"""``loraq demo``: the whole pipeline on data that ships with scikit-learn, on a laptop CPU.

The 1,797 real 8x8 handwritten digits; an over-parameterised MLP (64→1000→2000→10) pretrained
dense; then a sweep over int1 and sparse4x4 with the gaussian, svd and loftq inits on every
Linear layer (the 10-wide head gets a full-rank adapter where the rank exceeds it).
"""

from __future__ import annotations

import time
from typing import Any, Dict

from .sweep import DEFAULT_RANKS, SweepConfig, sweep
from .train import default_output

# Three trials per cell only sample well from a space without the hopeless corners (plain SGD,
# learning rates far from Adam's range); `loraq sweep` searches the full default space.
DEMO_SPACE = {"optimizer": ["adam", "adamw"], "lr": {"low": 3e-4, "high": 1e-2, "log": True}}
DEMO = dict(model="mlp", data="digits", hidden=(1000, 2000), pretrain_epochs=20, compressions=("int1", "sparse4x4"),
            inits=("gaussian", "svd", "loftq"), clip_rank=True, loftq_iters=3, seed=0, device="cpu",
            search_space=DEMO_SPACE)
FULL = dict(ranks=DEFAULT_RANKS, trials=3, epochs=4)
QUICK = dict(ranks=(4, 64), trials=2, epochs=3, pretrain_epochs=10)


def demo_config(quick: bool = False) -> SweepConfig:
    """The demo's sweep: about 6 minutes on 2 CPU cores, or about 1 minute with ``quick``."""
    return SweepConfig(**{**DEMO, **FULL, **(QUICK if quick else {})})


def demo(quick: bool = False, output=None, quiet: bool = False) -> Dict[str, Any]:
    """Run the demo sweep into ``output`` (default: a new folder under ``./loraq-runs/``).

    Returns :func:`loraq.sweep`'s result with ``seconds`` added.
    """
    started = time.time()
    result = sweep(demo_config(quick), output=output if output is not None else default_output("demo"), quiet=quiet)
    result["seconds"] = round(time.time() - started, 1)
    return result
