"""Named sets of IBDR settings that reproduce a source: :data:`PAPER` (the paper's objective) and
:data:`OFFICIAL` (the authors' public code, GitHub ``ngocquanofficial/DRO``).

A :class:`Preset` carries everything a run needs besides the model and the data: the loss settings, the
optimiser (with the units its learning rate assumes), the schedule, batch size, K, σ, the head sharing, the
prediction mode, the augmentation flag and the run length. ``fit(method, model, loader, preset=OFFICIAL)``
applies it; the experiment CLIs take ``--preset paper|official``. Per-task values (the authors' VTAB-1k
table) combine with :data:`OFFICIAL` in ``pyro_ibdr.experiments.vtab_settings``.

Change a default in one place: ``IBDRSettings``'s defaults are the paper's loss, and the instances below
hold everything else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .losses import IBDRSettings
from .methods import METHODS, OptimSettings
from .metrics import EnsembleMode
from .schedules import AUTHORS_WARMUP_STEPS, Schedule, ScheduleName, make_schedule

_OPTIM_FIELDS = {f.name for f in fields(OptimSettings)}
_LOSS_FIELDS = {f.name for f in fields(IBDRSettings)}


@dataclass(frozen=True)
class Preset:
    """One reproducible configuration of IBDR and of the optimisation around it.

    :param name: the preset's name (recorded in results).
    :param loss: the IBDR loss settings.
    :param optim: the weights' optimiser; its ``objective_scale`` fixes the units ``lr`` assumes.
    :param schedule: ``"constant"`` or ``"warmup_cosine"`` (linear warm-up, then cosine decay to 0).
    :param warmup_steps: the warm-up length of ``"warmup_cosine"``; a run not longer than it is an error
        naming both numbers (shorten it with ``preset.replace(warmup_steps=...)``).
    :param batch_size: the minibatch size the settings were made for (the CLIs use it; ``fit`` takes a loader).
    :param num_particles: K (the ensemble size of every method: particles, members, or training samples).
    :param sigma: σ of IBDR's particle Gaussians (0: point masses).
    :param learn_sigma: learn σ.
    :param shared_head: one task head shared by IBDR's particles (:class:`~pyro_ibdr.ParticleGuide`).
    :param prediction: how IBDR's particles combine at prediction (recorded on its posterior).
    :param augment: train with RandAugment + horizontal flips (the CLIs read it).
    :param epochs: the run length the settings were made for (``fit`` uses it when given neither epochs nor
        steps); None: the caller decides.
    :param method_lr: ``(method, lr)`` pairs: a method's own learning rate where ``optim.lr`` does not suit its
        optimiser (IVON's natural-gradient step, full fine-tuning, SGLD's drift); :meth:`optim_for` applies them. Giving
        ``lr`` to :meth:`replace` clears them (an explicit rate applies to every method).
    """

    name: str
    loss: IBDRSettings
    optim: OptimSettings
    schedule: ScheduleName = "constant"
    warmup_steps: int = 0
    batch_size: int = 32
    num_particles: int = 4
    sigma: float = 0.0
    learn_sigma: bool = False
    shared_head: bool = False
    prediction: EnsembleMode = "mean_probs"
    augment: bool = False
    epochs: int | None = None
    method_lr: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "warmup_cosine"):
            raise ValueError(f"schedule must be 'constant' or 'warmup_cosine', got {self.schedule!r}")
        if self.prediction not in ("mean_probs", "mean_logits"):
            raise ValueError(f"prediction must be 'mean_probs' or 'mean_logits', got {self.prediction!r}")
        for name in ("batch_size", "num_particles"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {self.epochs}")
        if not self.sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        names = [name for name, _ in self.method_lr]
        if len(set(names)) != len(names) or not set(names) <= set(METHODS):
            raise ValueError(f"method_lr must name registered methods once each, got {names}")
        if not all(lr > 0 for _, lr in self.method_lr):
            raise ValueError(f"method_lr rates must be positive, got {self.method_lr}")

    def replace(self, **changes: Any) -> Preset:
        """A copy with fields changed; optimiser fields (``lr``, ``optimizer``, ...) and loss fields
        (``alpha``, ``rho``, ``clip_norm``, ...) may be given directly.

        :raises TypeError: for a name that is none of these, listing the valid ones.
        """
        own = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - own - _OPTIM_FIELDS - _LOSS_FIELDS)
        if unknown:
            valid = sorted(own | _OPTIM_FIELDS | _LOSS_FIELDS)
            raise TypeError(f"a preset has no setting(s) {unknown}; valid: {valid}")
        optim = {k: changes.pop(k) for k in list(changes) if k in _OPTIM_FIELDS}
        if "lr" in optim:
            changes.setdefault("method_lr", ())
        loss = {k: changes.pop(k) for k in list(changes) if k in _LOSS_FIELDS}
        return replace(self, **changes, optim=replace(changes.get("optim", self.optim), **optim),
                       loss=replace(changes.get("loss", self.loss), **loss))

    def make_schedule(self, total_steps: int) -> Schedule:
        """The learning-rate multiplier for a run of ``total_steps``."""
        return make_schedule(self.schedule, total_steps, self.warmup_steps)

    def optim_for(self, method: str) -> OptimSettings:
        """``optim``, with ``method``'s own learning rate where :attr:`method_lr` gives one."""
        lr = dict(self.method_lr).get(method)
        return self.optim if lr is None else replace(self.optim, lr=lr)

    def method_options(self, method: str) -> dict[str, Any]:
        """Options of ``create_method(method, ...)``: every IBDR setting for ``"ibdr"``; the ensemble size
        (the config's ``size_field``) for the other methods."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known methods: {sorted(METHODS)}")
        if method == "ibdr":
            return {"num_particles": self.num_particles, "sigma": self.sigma, "learn_sigma": self.learn_sigma,
                    "shared_head": self.shared_head, "prediction": self.prediction, "loss": self.loss}
        size_field = METHODS[method].config_class.size_field
        return {size_field: self.num_particles} if size_field else {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The paper's objective (Pham et al., ICML 2025): per-particle cross-entropy, the DPP volume, the closed-form
#: ascent under the squared-Euclidean cost with a projected dual step, the paper's KL term; Adam at 2e-3 in
#: per-example units, K = 4, each particle with its own head, predicted with the mean of probabilities.
#: σ (learned, from 1e-3), the diversity kind (volume) and ρ (0.0025) were chosen by the lowest validation NLL
#: (train800 → val200 on the offline CIFAR-10 task, and a digits train/validation split; 3 seeds) among
#: volume/log-volume × σ ∈ {0, 1e-3, learned}, then ρ ∈ {ρ₀/4, ρ₀, 4ρ₀}, then η ∈ {1, 10, 100} and λ₀ ∈
#: {0.25, 1, 4} (which kept η = 10, λ₀ = 1): ``examples/select_defaults.py`` and the README's table.
#: Three baselines have their own rate, chosen by the same rule (lowest validation NLL; the offline
#: Fashion-MNIST task, train800 → val200, seed 0, the offline default's other settings): IVON 0.01 among
#: {0.005, 0.01, 0.02, 0.05, 0.1, 0.5} (Adam's 2e-3 barely moves its natural-gradient step; 0.05 and above
#: diverge), full fine-tuning 1e-4 among {5e-6, 2e-5, 1e-4, 5e-4} (Adam at 2e-3 on every weight destroyed the
#: backbone) and SGLD 0.01 among {2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1} (validation NLL 1.79 at
#: 2e-3 against 1.45 at 0.01 in the 64-step chain; 0.05 and above diverge).
PAPER = Preset(
    name="paper",
    loss=IBDRSettings(),
    optim=OptimSettings(lr=2e-3, optimizer="adam", objective_scale="per_example"),
    batch_size=32,
    num_particles=4,
    sigma=1e-3,
    learn_sigma=True,
    method_lr=(("fft", 1e-4), ("ivon", 1e-2), ("sgld", 1e-2)),
)

#: The authors' public code: cross-entropy of the mean of logits, the log-volume diversity (α = 0.02), the
#: clipped joint ascent g/(2λ), the output-space cost with its exponential barrier, λ₀ = 3 in [0.5, 5] stepped
#: with the weights' scheduled rate, no KL, σ = 0; SGD (momentum 0.9, no weight decay) at lr 0.1 in
#: per-example units, 500 warm-up steps then cosine, batch 64, 150 epochs, K = 4, one shared head, predicted
#: with the mean of logits. The per-task lr, K, ε (= ρ), clip and augmentation come from the VTAB-1k table.
OFFICIAL = Preset(
    name="official",
    loss=IBDRSettings(alpha=0.02, diversity="log_volume", data_loss="ensemble", ascent="closed_form", clip_norm=0.2,
                      cost="output", rho=0.03, lambda_init=3.0, lambda_bounds=(0.5, 5.0), dual_lr=None,
                      dual_schedule=True, kl="none"),
    optim=OptimSettings(lr=0.1, optimizer="sgd", momentum=0.9, weight_decay=0.0, objective_scale="per_example"),
    schedule="warmup_cosine",
    warmup_steps=AUTHORS_WARMUP_STEPS,
    batch_size=64,
    num_particles=4,
    shared_head=True,
    prediction="mean_logits",
    epochs=150,
)

PRESETS: dict[str, Preset] = {"paper": PAPER, "official": OFFICIAL}


def get_preset(preset: Preset | str) -> Preset:
    """A preset by name (``"paper"``, ``"official"``) or the preset itself."""
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[preset]
