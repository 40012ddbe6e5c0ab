"""The first cell of every notebook: ``SMOKE = setup()``.

Seeds Python, NumPy and torch so figures are identical between runs, sets readable matplotlib
defaults and returns the smoke flag (environment variable ``UMV2_SMOKE=1``, set by the test
command) that notebooks use to shrink training steps and sizes.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def smoke() -> bool:
    """True when the test command asked for the small, fast configuration."""
    return os.environ.get("UMV2_SMOKE", "0") == "1"


def setup(seed: int = 0) -> bool:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.figsize": (7, 3.5), "figure.dpi": 90, "axes.grid": True, "grid.alpha": 0.3})
    flag = smoke()
    print(f"torch {torch.__version__} | smoke mode: {flag} | seed {seed}")
    return flag
