"""Small numeric helpers (a leaf module)."""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, overflow-free (inputs clipped to ±60)."""
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))
