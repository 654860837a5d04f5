"""Learning-rate schedules: callables ``step ↦ multiplier`` applied to the base rate (lr_t = lr · m(t)).

Steps count from 0. Each schedule validates its settings on construction and its argument on call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

#: Warm-up length of the IBDR authors' code (linear warm-up, then cosine decay).
AUTHORS_WARMUP_STEPS = 500

ScheduleName = Literal["constant", "warmup_cosine"]


class Schedule(Protocol):
    def __call__(self, step: int) -> float: ...


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"the step must be an integer >= 0, got {step!r}")


@dataclass(frozen=True)
class Constant:
    """m(t) = 1."""

    def __call__(self, step: int) -> float:
        _check_step(step)
        return 1.0


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up over W steps, then cosine decay to ``min_factor`` at step T:

        m(t) = (t + 1) / W                                   for t < W,
        m(t) = f + (1 − f) · ½ (1 + cos(π (t − W) / (T − W)))  for W ≤ t ≤ T,   m(t) = f for t > T.

    The warm-up starts at 1/W rather than 0 so that the first step moves the weights.

    :param total_steps: T, the length of the run.
    :param warmup_steps: W (the authors use 500); 0 disables the warm-up.
    :param min_factor: f ∈ [0, 1], the final multiplier.
    """

    total_steps: int
    warmup_steps: int = AUTHORS_WARMUP_STEPS
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"a run of {self.total_steps} steps is not longer than its warm-up of {self.warmup_steps} steps, so "
                "there is no room for the cosine decay: train for more steps, or shorten the warm-up (warmup_steps "
                "of the schedule or preset, e.g. preset.replace(warmup_steps=...); --warmup-steps in the CLIs)"
            )
        if not 0.0 <= self.min_factor <= 1.0:
            raise ValueError(f"min_factor must lie in [0, 1], got {self.min_factor}")

    def __call__(self, step: int) -> float:
        _check_step(step)
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_schedule(name: ScheduleName, total_steps: int, warmup_steps: int = AUTHORS_WARMUP_STEPS) -> Schedule:
    """A schedule by name for a run of ``total_steps``.

    ``"warmup_cosine"`` warms up for ``warmup_steps`` (the authors' 500 by default), whatever the run's
    length: a run not longer than its warm-up is an error naming both numbers (never a silently shortened
    warm-up).
    """
    if name == "constant":
        return Constant()
    if name == "warmup_cosine":
        return WarmupCosine(total_steps, warmup_steps=warmup_steps)
    raise ValueError(f"unknown schedule {name!r}; use 'constant', 'warmup_cosine' or a callable step -> multiplier")
