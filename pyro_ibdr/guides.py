"""The IBDR posterior: an equal-weight mixture of K isotropic Gaussians over θ."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.runtime import get_plates

from .initialisation import seeded_particles
from .model import THETA, BayesianLoRA
from .posterior import ParticlePosterior


class ParticleGuide:
    """Q = (1/K) Σ_i N(μ_i, σ² I) as a Pyro guide with reparameterised draws θ_i = μ_i + σ ε_i.

    Called inside a vectorising plate of size P (IBDRLoss's particle plate, ``Predictive(parallel=True)``,
    ``Trace_ELBO(vectorize_particles=True)``), draw p comes from component p mod K, and P must be a multiple
    of K: with P = K every particle gets its own component, with P = S samples each component gets exactly
    S/K draws (exact stratification). Outside any plate one component is picked uniformly at random.

    **Shared head.** With ``shared_head=True`` the entries of θ that belong to peft ``modules_to_save``
    copies (:meth:`~pyro_ibdr.ParamSpec.head_mask`: the task head) are ONE set of parameters shared by all
    particles, as in the IBDR authors' code: the param store holds μ's own entries as ``{name}.particle_loc``
    (K, D_own) and the head as ``{name}.shared_loc`` (D_head,), and :attr:`loc` assembles the (K, D) means.
    The shared entries then receive the sum of the particles' gradients. A model without ``modules_to_save``
    entries has nothing to share (the setting changes nothing). Without sharing, μ is ``{name}.loc`` (K, D).

    :param model: the :class:`BayesianLoRA` model (gives D and the LoRA initialisation of μ).
    :param num_particles: K ≥ 1.
    :param sigma: σ ≥ 0; σ = 0 makes every component a point mass (particles are point estimates).
    :param learn_sigma: make σ a positive ``pyro.param`` (requires σ > 0).
    :param shared_head: share the ``modules_to_save`` entries of θ between the particles.
    :param init_loc: (K, D) initial means; default: K independent LoRA initialisations
        (:func:`~pyro_ibdr.initialisation.seeded_particles` with ``seed``, or the global RNG without one).
    :param name: prefix of this guide's names in Pyro's param store.
    :param seed: seed of the initialisation (particle k from seed + k).
    """

    def __init__(
        self,
        model: BayesianLoRA,
        num_particles: int = 4,
        sigma: float = 0.0,
        *,
        learn_sigma: bool = False,
        shared_head: bool = False,
        init_loc: torch.Tensor | None = None,
        name: str = "particle_guide",
        seed: int | None = None,
    ) -> None:
        if num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {num_particles}")
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if learn_sigma and sigma == 0:
            raise ValueError("a learnable sigma needs a positive initial value")
        self.model = model
        self.num_particles = int(num_particles)
        self.sigma = float(sigma)
        self.learn_sigma = learn_sigma
        self.name = name
        if init_loc is None:
            init_loc = (seeded_particles(model, self.num_particles, seed) if seed is not None
                        else model.init_particles(self.num_particles))
        if init_loc.shape != (self.num_particles, model.dim):
            expected = (self.num_particles, model.dim)
            raise ValueError(f"init_loc must have shape {expected}, got {tuple(init_loc.shape)}")
        self._init_loc = init_loc.detach().clone()
        mask = model.spec.head_mask().to(self._init_loc.device)
        #: Boolean (D,) mask of the entries shared by all particles, or None.
        self.shared_mask = mask if shared_head and bool(mask.any()) else None
        if self.shared_mask is not None:
            head = self._init_loc[:, self.shared_mask]
            if not torch.equal(head, head[:1].expand_as(head)):
                raise ValueError("shared_head=True needs init_loc rows with equal head (modules_to_save) entries")
            # θ = cat([own entries, head entries])[:, order] puts every entry back at its place in θ.
            self._order = torch.argsort(torch.cat([(~mask).nonzero()[:, 0], mask.nonzero()[:, 0]]))

    @property
    def loc(self) -> torch.Tensor:
        """μ (K, D) (assembled from the particles' own entries and the shared head with ``shared_head``)."""
        if self.shared_mask is None:
            return pyro.param(f"{self.name}.loc", lambda: self._init_loc.clone())
        own = pyro.param(f"{self.name}.particle_loc", lambda: self._init_loc[:, ~self.shared_mask].clone())
        head = pyro.param(f"{self.name}.shared_loc", lambda: self._init_loc[0, self.shared_mask].clone())
        return torch.cat([own, head.expand(self.num_particles, -1)], dim=-1)[:, self._order]

    @property
    def scale(self) -> torch.Tensor:
        """σ (a scalar tensor)."""
        if self.learn_sigma:
            return pyro.param(f"{self.name}.scale", lambda: torch.tensor(self.sigma), constraint=constraints.positive)
        return torch.tensor(self.sigma, device=self._init_loc.device)

    @staticmethod
    def _vectorising_plate() -> CondIndepStackFrame | None:
        """The outermost enclosing plate (the guide declares none of its own), or None outside any."""
        frames = [frame for frame in get_plates() if frame.vectorized]
        return min(frames, key=lambda frame: frame.dim) if frames else None

    def _component_dist(self, loc: torch.Tensor) -> dist.Distribution:
        if self.sigma == 0 and not self.learn_sigma:
            return dist.Delta(loc, event_dim=1)
        return dist.Normal(loc, self.scale).to_event(1)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        loc = self.loc
        plate = self._vectorising_plate()
        if plate is None:
            picked = loc[torch.randint(self.num_particles, ())]
        else:
            if plate.size % self.num_particles:
                raise ValueError(
                    f"the {plate.size} draws of the plate {plate.name!r} cannot be stratified exactly over "
                    f"K = {self.num_particles} components: use a multiple of {self.num_particles} samples"
                )
            components = torch.arange(plate.size, device=loc.device) % self.num_particles
            picked = loc[components].reshape(plate.size, *([1] * (-plate.dim - 1)), -1)
        return pyro.sample(THETA, self._component_dist(picked))

    def posterior(self) -> ParticlePosterior:
        """The current Q as a :class:`ParticlePosterior` (draws stratified over the components)."""
        return ParticlePosterior(self.loc.detach().clone(), self.scale.detach().clone())

    def mixture(self) -> dist.Distribution:
        """Q itself, (1/K) Σ_i N(μ_i, σ² I), for densities and i.i.d. draws (requires σ > 0)."""
        if self.sigma == 0 and not self.learn_sigma:
            raise ValueError("Q is a sum of point masses when sigma = 0; it has no density")
        weights = dist.Categorical(logits=torch.zeros(self.num_particles, device=self._init_loc.device))
        return dist.MixtureSameFamily(weights, dist.Normal(self.loc, self.scale).to_event(1))
