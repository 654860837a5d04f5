"""Runs of the digits model by one process and by a gloo group of spawned processes, for the distributed tests.

A scenario is one ``fit`` call: a method with its options, trained 6 SGD steps (3 batches of 32, 33 and 31 rows,
two epochs, so that data-parallel shards are uneven). :func:`spawn_group` runs every scenario in a group of
processes (one ``torch.multiprocessing.spawn``, one thread each) and returns each rank's results; the tests
compare them with :func:`run` in the test process itself.
"""

from __future__ import annotations

import itertools
import os
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pyro import poutine

from pyro_ibdr import BayesianLoRA, distributed, load_checkpoint, save_checkpoint
from pyro_ibdr.evaluation import fixed_draws
from pyro_ibdr.guides import ParticleGuide
from pyro_ibdr.methods import OptimSettings, create_method
from pyro_ibdr.model import LOGITS, THETA
from pyro_ibdr.predictive import predict_loader
from pyro_ibdr.train import fit
from tests._dummies.data import digits
from tests._dummies.nets import lora_mlp

SIZES = (32, 33, 31)
SGD = OptimSettings(lr=0.05, optimizer="sgd", momentum=0.9, objective_scale="per_example")
#: The paper's objective with a learnable σ and the closed-form ascent, clipped; log-volume diversity.
IBDR = {"num_particles": 4, "sigma": 0.01, "learn_sigma": True, "alpha": 0.1, "diversity": "log_volume",
        "clip_norm": 0.5, "dual_lr": 10.0}
#: The authors' code: shared head, ensemble cross-entropy, output-space cost with clamped λ, no KL.
AUTHORS = {"num_particles": 4, "shared_head": True, "data_loss": "ensemble", "alpha": 0.05,
           "diversity": "log_volume", "clip_norm": 0.2, "cost": "output", "rho": 0.001, "lambda_bounds": (0.5, 5.0),
           "kl": "none", "prediction": "mean_logits"}
#: name → (method, options); each runs in both modes unless listed in ERRORS for that mode.
SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    "ibdr": ("ibdr", IBDR),
    "ibdr_authors": ("ibdr", AUTHORS),
    "svgd": ("svgd", {"num_particles": 4}),
    "ensemble": ("ensemble", {"num_particles": 4}),
    "map": ("map", {}),
    "sam": ("sam", {}),
    "bbb": ("bbb", {"num_samples": 2}),
    "sa_bnn": ("sa_bnn", {"num_samples": 2}),
    "sgld": ("sgld", {"burn_in": 2, "thin": 1, "num_samples": 3}),
    "laplace": ("laplace", {"marglik_steps": 5}),
    "ivon": ("ivon", {"mc_samples": 2}),
    "blob": ("blob", {"num_samples": 2}),
    "bayestune": ("bayestune", {"selection_steps": 3, "burn_in_fraction": 0.5}),
    "fhbi": ("fhbi", {"num_particles": 4, "rho": 0.05}),
}
PARTICLE = ("ibdr", "ibdr_authors", "svgd", "ensemble")
#: Runs that must fail in a 2-process group, with the error's text.
ERRORS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "particle_map": ("particle", "map", {}, "'map' does not run under distributed='particle' (supported: 'data')"),
    "particle_bbb": ("particle", "bbb", {}, "method 'bbb' does not run under distributed='particle'"),
    "particle_sgld": ("particle", "sgld", {}, "method 'sgld' does not run under distributed='particle'"),
    "particle_sam": ("particle", "sam", {}, "K = 1 particles cannot be split evenly over 2"),
    "particle_laplace": ("particle", "laplace", {}, "method 'laplace' does not run under distributed='particle' "
                         "(supported: 'data')"),
    "particle_fhbi": ("particle", "fhbi", {}, "method 'fhbi' does not run under distributed='particle' "
                      "(supported: 'data')"),
    "particle_odd_k": ("particle", "ibdr", {"num_particles": 3}, "K = 3 particles cannot be split evenly over 2"),
}


def problem(dropout: float = 0.0) -> tuple[BayesianLoRA, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """(model, the three training batches, 50 test inputs)."""
    x, y, x_test, _ = digits(n_train=1000)
    starts = [0, *torch.tensor(SIZES).cumsum(0).tolist()]
    batches = [(x[a:b], y[a:b]) for a, b in itertools.pairwise(starts)]
    return BayesianLoRA(lora_mlp(rank=4, dropout=dropout).eval(), num_data=len(y)), batches, x_test[:50]


def run(name: str, mode: distributed.Mode | None = None) -> dict[str, Any]:
    """One scenario's history, posterior tensors and method state."""
    method, options = SCENARIOS[name]
    model, batches, _ = problem()
    result = fit(method, model, batches, epochs=2, optim=SGD, seed=3, progress=False, distributed=mode, **options)
    return {"history": result.history, "posterior": result.posterior.tensors(), "state": result.state,
            "distributed": result.distributed}


def _error(mode: distributed.Mode, method: str, options: dict[str, Any]) -> str:
    model, batches, _ = problem()
    try:
        fit(method, model, batches, steps=1, progress=False, distributed=mode, **options)
    except ValueError as error:
        return str(error)
    return "no error"


def checkpoints(folder: Path) -> dict[str, Any]:
    """Particle-parallel checkpoint and prediction round trips (run in the group): the gathered posterior saved
    by rank 0; a 1-process checkpoint (written by the test) split on loading; predictions of all particles."""
    model, batches, x_test = problem()
    result = fit("ibdr", model, batches, epochs=1, optim=SGD, seed=3, progress=False, distributed="particle", **IBDR)
    if distributed.is_main_process():
        save_checkpoint(folder / "group.pt", result.posterior, spec=model.spec, method="ibdr", config={}, seed=3)
    distributed.barrier()
    loaded = load_checkpoint(folder / "single.pt").posterior
    with distributed.parallel("particle"):
        pyro.clear_param_store()
        guide = ParticleGuide(model, 4, init_loc=loaded.particles, name="loaded")
        held, gathered = guide.loc.detach().clone(), guide.posterior().particles
        test = [(x_test, torch.zeros(len(x_test), dtype=torch.long))]
        probs, _ = predict_loader(model, fixed_draws(loaded, None, seed=0), test)
    return {"held": held, "gathered": gathered, "probs": probs}


def randomness() -> dict[str, Any]:
    """A dropout forward of the same θ and inputs on every process of a data-parallel group, and the global RNG
    state after it."""
    model, batches, _ = problem(dropout=0.5)
    pyro.set_rng_seed(0)
    model.net.train()
    conditioned = poutine.condition(model, data={THETA: model.theta0})
    with distributed.parallel("data"):
        logits = poutine.trace(conditioned).get_trace(batches[0][0]).nodes[LOGITS]["value"]
    return {"logits": logits.detach(), "rng": torch.get_rng_state()}


def traffic() -> dict[str, Any]:
    """The bytes each kind of collective moved in one IBDR step (the second) in each mode, and D."""
    counted: dict[str, Any] = {}
    for mode in ("particle", "data"):
        model, batches, _ = problem()
        with distributed.parallel(mode):
            pyro.clear_param_store()
            method = create_method("ibdr", model, optim=SGD, **IBDR)
            x, y = distributed.shard_batch(*batches[0])
            method.step(x, y)
            distributed.traffic.clear()
            method.step(x, y)
            counted[mode] = dict(distributed.traffic)
    counted["dim"] = model.dim
    return counted


def _worker(rank: int, world: int, folder: str, jobs: list[str]) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))  # a failing rank must not leave the other waiting
    results: dict[str, Any] = {}
    try:
        for job in jobs:
            results[job] = JOBS[job](Path(folder))
    except Exception:
        results["error"] = traceback.format_exc()
    finally:
        torch.save(results, Path(folder) / f"rank{rank}.pt")
        dist.destroy_process_group()


JOBS: dict[str, Callable[[Path], Any]] = {
    **{f"data_{name}": (lambda _, n=name: run(n, "data")) for name in SCENARIOS},
    **{f"particle_{name}": (lambda _, n=name: run(n, "particle")) for name in PARTICLE},
    **{key: (lambda _, spec=spec: _error(*spec[:3])) for key, spec in ERRORS.items()},
    "checkpoints": checkpoints,
    "randomness": lambda _: randomness(),
    "traffic": lambda _: traffic(),
}


def spawn_group(folder: Path, world: int = 2, jobs: list[str] | None = None) -> list[dict[str, Any]]:
    """Run ``jobs`` (default: all) in a gloo group of ``world`` spawned processes; each rank's results."""
    mp.spawn(_worker, args=(world, str(folder), jobs or list(JOBS)), nprocs=world)
    results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, result in enumerate(results):
        if "error" in result:
            raise RuntimeError(f"rank {r} failed:\n{result['error']}")
    return results
