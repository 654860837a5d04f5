"""Mixed precision: the network's matmuls in bfloat16 or float16 through ``torch.autocast``.

Only the network runs in low precision. θ (the trainable adapter vector and every guide parameter) stays in
its own dtype, float32 even for a network held in float16/bfloat16 (:class:`~pyro_ibdr.BayesianLoRA`), the
logits are returned in float32, so softmax, likelihood and metrics run in float32, and the diversity Gram
matrix is built in float64 (:func:`~pyro_ibdr.dpp_log_volume`).

No gradient scaler: Pyro's ``SVI.step`` runs backward and the optimiser step in one call (no place to unscale
and skip), a scaled loss would change IBDR's closed-form ascent g/(2λ) and SVGD's balance between the kernel
and its gradient, and Pyro's losses are already sums scaled to the data set (N/B Σ_b), N times the
per-example mean that AMP's loss scale protects from float16 underflow. A non-finite loss raises
``FloatingPointError`` naming the step; bfloat16 (float32's exponent range) avoids overflow altogether.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]
#: The autocast dtype of each precision setting (None: no autocast).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> None:
    """Raise a ValueError naming the valid settings unless ``precision`` is one of them."""
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {sorted(AUTOCAST_DTYPES)}, got {precision!r}")


def autocast(precision: Precision, device: torch.device | str) -> AbstractContextManager:
    """``torch.autocast(device type, dtype)`` for ``"bf16"``/``"fp16"``; a no-op for ``"fp32"``.

    :raises ValueError: for an unknown setting or a device type autocast does not support (cpu and cuda are).
    """
    check_precision(precision)
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return nullcontext()
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"precision {precision!r} uses torch.autocast on cpu or cuda, not on {device_type!r}")
    return torch.autocast(device_type, dtype=dtype)
