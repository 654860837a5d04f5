"""PVeRA: peft's probabilistic vector-based random-matrix adapter, its noise sampled at test as MC dropout's masks."""

from __future__ import annotations

from dataclasses import dataclass

from ..model import BayesianLoRA
from .base import MethodConfig
from .mc_dropout import MCDropout

#: The name part of peft's trainable PVeRA vectors (``...pvera_lambda_b.default``, ``...pvera_lambda_d.default``).
PVERA_VECTORS = ".pvera_lambda_"


@dataclass(frozen=True)
class PVeRAConfig(MethodConfig):
    """PVeRA has no settings beyond the network's ``peft.PveraConfig`` and the optimiser."""


class PVeRA(MCDropout):
    r"""peft's PVeRA adapter (``peft.PveraConfig``, arXiv 2512.07703) trained and predicted in this harness.

    An adapted Linear layer computes W0 x + λ_b ⊙ (B z) with

        (μ, log σ²) = split(λ_d ⊙ (A x)),    z = μ + ε ⊙ exp(½ log σ²),    ε ~ N(0, I),

    where A (2r × in) and B (out × r) are frozen random projections shared by every layer and θ holds the trained
    vectors λ_b (out) and λ_d (2r) of each layer, plus any ``modules_to_save`` head. peft draws ε per activation
    whenever the layer is in training mode (or with ``sample_at_inference``); λ_b starts at 0, so θ0 is the
    pretrained function. The randomness is in the activations, not in θ, so in the one-latent-site model PVeRA is
    a point estimate with a stochastic network, like MC dropout: θ is fitted as in :class:`~pyro_ibdr.methods.MAP`
    with ε sampled (training mode), and the posterior is the point mass θ_MAP with ``dropout_at_test``, so the
    predictive averages p(y | x, θ_MAP, ε_s) over S draws (training mode at test, which also samples any dropout
    of the network). peft's implementation adds no KL term for q(z | x), and neither does this method.

    :raises ValueError: when θ holds no PVeRA vectors (build the network with ``peft.PveraConfig``).
    """

    name = "pvera"
    config_class = PVeRAConfig
    adapter = "pvera"

    @staticmethod
    def check_network(model: BayesianLoRA) -> None:
        if not any(PVERA_VECTORS in name for name in model.spec.names):
            raise ValueError(
                "pvera needs a network adapted with peft.get_peft_model(net, peft.PveraConfig(...)); "
                f"θ holds no PVeRA vectors (names with {PVERA_VECTORS!r})"
            )
