"""FFT: full fine-tuning, every weight of a plain (non-peft) network in θ, as a MAP point estimate."""

from __future__ import annotations

from dataclasses import dataclass

from ..model import BayesianLoRA
from ..params import is_lora_factor
from .base import MethodConfig, OptimSettings
from .map import MAP


@dataclass(frozen=True)
class FFTConfig(MethodConfig):
    """FFT has no settings beyond the model's prior and the optimiser."""


def check_full_network(model: BayesianLoRA) -> None:
    """Raise ``ValueError`` unless θ holds every parameter of ``model.net`` and the network has no LoRA adapters."""
    names = [name for name, _ in model.net.named_parameters()]
    adapters = [name for name in names if is_lora_factor(name)]
    if adapters:
        raise ValueError(
            f"full fine-tuning needs a plain network without LoRA adapters; this one has {len(adapters)} LoRA tensors "
            f"(e.g. {adapters[0]}): build it without peft.get_peft_model"
        )
    missing = sorted(set(names) - set(model.spec.names))
    if missing:
        raise ValueError(
            f"full fine-tuning trains every weight, but {len(missing)} parameters are not in θ (e.g. {missing[:3]}): "
            "call net.requires_grad_(True) before BayesianLoRA(net, ...), or pass select=lambda name, p: True"
        )


class FFT(MAP):
    r"""The paper's FFT baseline (IBDR, Tables 1–2): every backbone weight and the head are trained, no LoRA.

    θ is the flat vector of all D parameters of a plain network (``BayesianLoRA(net, ...)`` on a module whose
    parameters all require grad), θ_MAP = argmax_θ [log p(θ) + (N/B) Σ_b log p(y_b | x_b, θ)] from the pretrained
    weights θ0 (a zero head in the experiments). The N(0, s²I) prior is coupled weight decay 1/(N s²) per example,
    as for :class:`~pyro_ibdr.methods.MAP`; it pulls the pretrained weights towards 0, weakly for N s² ≫ 1. The
    posterior is one point mass (K = 1).

    :raises ValueError: when θ misses a parameter of the network or the network carries LoRA adapters.
    """

    name = "fft"
    config_class = FFTConfig
    adapter = "full"

    def __init__(
        self, model: BayesianLoRA, config: FFTConfig | None = None, optim: OptimSettings | None = None,
        *, seed: int = 0,
    ) -> None:
        check_full_network(model)
        super().__init__(model, config, optim, seed=seed)
