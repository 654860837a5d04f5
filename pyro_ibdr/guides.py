"""The IBDR posterior: an equal-weight mixture of K isotropic Gaussians over θ."""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.runtime import get_plates

from . import distributed
from .checks import positive_int, real_number
from .initialisation import seeded_particles
from .model import THETA, BayesianLoRA
from .param_store import shaped_param
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

    **Particle parallelism.** Under ``pyro_ibdr.distributed.parallel("particle")`` the guide holds only this
    process's block of the K components (:func:`~pyro_ibdr.distributed.particle_rows` of the K rows of
    ``init_loc`` or of the seeded initialisation, so K particles saved by any run are split on loading):
    :attr:`num_particles` is then K/W and :attr:`total_particles` K; the parameters named in
    :attr:`sharded_params` hold only these rows, σ and a shared head are held by every process. The Gaussian
    draws are this process's rows of the draw one process makes for all K components, so a particle-parallel
    run draws what one process draws. :meth:`posterior` gathers all K components.

    :param model: the :class:`BayesianLoRA` model (gives D and the LoRA initialisation of μ).
    :param num_particles: K ≥ 1 (over all processes).
    :param sigma: σ ≥ 0; σ = 0 makes every component a point mass (particles are point estimates).
    :param learn_sigma: make σ a positive ``pyro.param`` (requires σ > 0).
    :param shared_head: share the ``modules_to_save`` entries of θ between the particles.
    :param init_loc: (K, D) initial means; default: K independent LoRA initialisations
        (:func:`~pyro_ibdr.initialisation.seeded_particles` with ``seed``, or the global RNG without one).
    :param name: prefix of this guide's names in Pyro's global param store. Guides of one name share their
        parameters (Pyro's semantics); one that finds a stored parameter of another shape (e.g. another K) raises
        ``ValueError``: clear the store (``pyro.clear_param_store()``, as :func:`~pyro_ibdr.fit` does) or rename.
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
        if not isinstance(model, BayesianLoRA):
            raise TypeError(f"model must be a BayesianLoRA, got {type(model).__name__}")
        num_particles = positive_int("num_particles", num_particles)
        if not real_number("sigma", sigma) >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if learn_sigma and sigma == 0:
            raise ValueError("a learnable sigma needs a positive initial value; for point masses pass sigma=0 with "
                             "learn_sigma=False (the paper preset learns σ: PAPER.replace(sigma=0, learn_sigma=False))")
        self.model = model
        #: K, the components over all processes.
        self.total_particles = int(num_particles)
        self.sigma = float(sigma)
        self.learn_sigma = learn_sigma
        self.name = name
        if init_loc is None:
            init_loc = (seeded_particles(model, self.total_particles, seed) if seed is not None
                        else model.init_particles(self.total_particles))
        if not isinstance(init_loc, torch.Tensor) or not init_loc.is_floating_point() or not init_loc.isfinite().all():
            got = f"dtype {init_loc.dtype}" if isinstance(init_loc, torch.Tensor) else type(init_loc).__name__
            raise ValueError(f"init_loc must be a tensor of finite floating-point values, got {got} (or NaN/inf)")
        if init_loc.shape != (self.total_particles, model.dim):
            expected = (self.total_particles, model.dim)
            raise ValueError(f"init_loc must have shape {expected}, got {tuple(init_loc.shape)}")
        self._rows = distributed.particle_rows(self.total_particles)
        #: The components this process holds: K, or K/W under particle parallelism.
        self.num_particles = self._rows.stop - self._rows.start
        self._init_loc = init_loc[self._rows].detach().clone()
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
            return shaped_param(f"{self.name}.loc", self._init_loc.clone, self._init_loc.shape)
        own_init, head_init = self._init_loc[:, ~self.shared_mask], self._init_loc[0, self.shared_mask]
        own = shaped_param(f"{self.name}.particle_loc", own_init.clone, own_init.shape)
        head = shaped_param(f"{self.name}.shared_loc", head_init.clone, head_init.shape)
        return torch.cat([own, head.expand(self.num_particles, -1)], dim=-1)[:, self._order]

    @property
    def scale(self) -> torch.Tensor:
        """σ (a scalar tensor)."""
        if self.learn_sigma:
            return shaped_param(f"{self.name}.scale", lambda: torch.tensor(self.sigma), (), constraints.positive)
        return torch.tensor(self.sigma, device=self._init_loc.device)

    @staticmethod
    def _vectorising_plate() -> CondIndepStackFrame | None:
        """The outermost enclosing plate (the guide declares none of its own), or None outside any."""
        frames = [frame for frame in get_plates() if frame.vectorized]
        return min(frames, key=lambda frame: frame.dim) if frames else None

    @property
    def sharded_params(self) -> tuple[str, ...]:
        """The param-store names that hold only this process's particles under particle parallelism."""
        return f"{self.name}.loc", f"{self.name}.particle_loc"

    def _component_dist(self, loc: torch.Tensor) -> dist.Distribution:
        """The draws' distribution for the picked means (P, ..., D), P a multiple of the held components."""
        if self.sigma == 0 and not self.learn_sigma:
            return dist.Delta(loc, event_dim=1)
        if self.num_particles == self.total_particles:
            return dist.Normal(loc, self.scale).to_event(1)
        # Draw p = j·(K/W) + c of this process is draw j·K + start + c of one process holding all K components.
        blocks = torch.arange(loc.shape[0] // self.num_particles, device=loc.device)
        rows = (blocks[:, None] * self.total_particles + self._rows.start
                + torch.arange(self.num_particles, device=loc.device)).reshape(-1)
        return _ProcessRowsNormal(loc, self.scale, rows, blocks.numel() * self.total_particles).to_event(1)

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
        """The current Q as a :class:`ParticlePosterior` (draws stratified over the components); all K components,
        gathered from every process under particle parallelism."""
        return ParticlePosterior(distributed.gather_particles(self.loc.detach()).clone(), self.scale.detach().clone())

    def mixture(self) -> dist.Distribution:
        """Q itself, (1/K) Σ_i N(μ_i, σ² I), for densities and i.i.d. draws (requires σ > 0); under particle
        parallelism, the mixture of this process's components."""
        if self.sigma == 0 and not self.learn_sigma:
            raise ValueError("Q is a sum of point masses when sigma = 0; it has no density")
        weights = dist.Categorical(logits=torch.zeros(self.num_particles, device=self._init_loc.device))
        return dist.MixtureSameFamily(weights, dist.Normal(self.loc, self.scale).to_event(1))


class _ProcessRowsNormal(dist.Normal):
    """N(loc, scale²) whose reparameterised draw of the rows (P, ...) is taken from one standard-normal draw for
    ``total`` rows: the rows ``rows`` of the draw one process holding every component makes."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, total: int) -> None:
        super().__init__(loc, scale)
        self.rows, self.total = rows, total

    def expand(self, batch_shape: torch.Size, _instance: Any = None) -> _ProcessRowsNormal:
        """The same draw rule for loc and scale broadcast to ``batch_shape`` (a plate's broadcast)."""
        shape = torch.Size(batch_shape)
        return _ProcessRowsNormal(self.loc.expand(shape), self.scale.expand(shape), self.rows, self.total)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008 (torch's signature)
        if sample_shape:
            raise ValueError("draws of a particle-parallel guide come one per plate entry (no sample_shape)")
        shape = self._extended_shape()
        eps = torch.empty((self.total, *shape[1:]), dtype=self.loc.dtype, device=self.loc.device).normal_()
        return self.loc + eps[self.rows] * self.scale
