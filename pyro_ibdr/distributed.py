r"""The process group and the collective operations the library needs, with a no-op single-process default.

Training on several processes runs on ``torch.distributed``, launched with ``torchrun`` (gloo on CPU, nccl on
GPUs, one process per GPU). :func:`parallel` selects one of two modes for the code inside it
(``fit(..., distributed=...)`` enters it):

- ``"data"``: every process holds all K particles and a shard of each global batch of B rows (contiguous
  rows, :func:`shard_batch`; shard sizes B_r differ by at most one). Every shard-local quantity the
  library reduces is a batch mean: a per-example mean, or an ELBO-scaled sum (N/B_r) Σ_b plus terms that do
  not depend on the batch (prior, KL). The global value is then the share-weighted mean Σ_r (B_r/B) v_r
  (:func:`batch_mean`), exactly what one process computes on the whole batch.
- ``"particle"``: the K particles are split into contiguous blocks of K/W (:func:`particle_rows`); every
  process sees the whole batch. Interaction terms work on all particles' outputs gathered with gradients
  (:func:`gather_particles`): every process computes the same global term and back-propagates the share
  1/W of it (:func:`loss_share`); the gather's backward sums the W contributions, so each process's own
  particles receive the gradient one process would give them. Quantities summed over particles are summed
  over processes (:func:`particle_sum`), and so are the gradients of parameters all processes hold (a
  learnable σ, a shared head).

Everything else in the library calls these functions unconditionally: outside :func:`parallel`, or in a
world of one process, they return their input and communicate nothing.

**Communication volume.** Every collective goes through this module and adds its payload to :data:`traffic`:
the bytes this process puts into the collective (all-reduce: the tensor; all-gather: the local part;
broadcast: the object's pickle on the source). The backward of :func:`gather_particles` is an all-reduce
of the gathered tensor's gradient (supported by every backend; nccl's reduce-scatter would send 1/W of it).
"""

from __future__ import annotations

import functools
import itertools
import os
import pickle
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

Mode = Literal["data", "particle"]
MODES: tuple[Mode, ...] = ("data", "particle")

_mode: Mode | None = None
_streams = itertools.count()
T = TypeVar("T")


# ------------------------------------------------------------------------------------------ the group
def is_initialized() -> bool:
    """Whether this process belongs to an initialised ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """W, the number of processes of the group (1 without one)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank r in the group (0 without one)."""
    return dist.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0 (or no group): the process that writes results, logs and reports."""
    return rank() == 0


def launch_environment() -> tuple[int, int]:
    """(rank, world size) that ``torchrun`` put in the environment (``RANK``, ``WORLD_SIZE``); (0, 1) without."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError as error:
        raise ValueError(f"RANK and WORLD_SIZE must be integers: {error}") from error


def init_process_group(device: str | torch.device = "cpu") -> int:
    """Join the process group that ``torchrun`` describes in the environment and return its world size.

    The backend is gloo for ``device`` CPU and nccl for CUDA, where each process first selects GPU
    ``LOCAL_RANK`` (so that ``"cuda"`` means its own GPU). Without torchrun's variables (a plain
    ``python`` run) no group is created and the world has one process. Calling it again is a no-op.

    :raises ValueError: for a device that is neither CPU nor CUDA.
    """
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"distributed runs support cpu (gloo) and cuda (nccl) devices, got {device}")
    if is_initialized():
        return world_size()
    _, size = launch_environment()
    if size == 1 and "MASTER_ADDR" not in os.environ:
        return 1
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world_size()


def destroy_process_group() -> None:
    """Leave the process group (no-op without one)."""
    if is_initialized():
        dist.destroy_process_group()


@contextmanager
def parallel(mode: Mode | None) -> Iterator[None]:
    """Run the block data-parallel (``"data"``), particle-parallel (``"particle"``) or as one process (None).

    A mode needs no process group: in a world of one process every collective is a no-op. Every process of
    the group must run the same code inside the block (the collectives pair up in call order).

    :raises ValueError: for an unknown mode, or a mode nested inside a different one.
    """
    global _mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES} or None, got {mode!r}")
    if _mode is not None and mode is not None and mode != _mode:
        raise ValueError(f"cannot run distributed={mode!r} inside distributed={_mode!r}")
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


def mode() -> Mode | None:
    """The active mode, or None outside :func:`parallel` and in a world of one process."""
    return _mode if world_size() > 1 else None


# --------------------------------------------------------------------------------------- accounting
class Traffic(Counter):
    """Bytes this process put into each kind of collective, and the number of calls (``"<kind> calls"``)."""

    def add(self, kind: str, nbytes: int) -> None:
        self[kind] += nbytes
        self[f"{kind} calls"] += 1

    def total_bytes(self) -> int:
        return sum(value for key, value in self.items() if not key.endswith(" calls"))


#: The communication this process has done through this module (reset it with ``traffic.clear()``).
traffic = Traffic()


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Σ over processes (a new tensor)."""
    out = tensor.detach().clone().contiguous()
    traffic.add("all_reduce", out.numel() * out.element_size())
    dist.all_reduce(out)
    return out


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The processes' equal-shaped tensors concatenated along dim 0, in rank order."""
    local = tensor.detach().contiguous()
    traffic.add("all_gather", local.numel() * local.element_size())
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts)


def broadcast_object(value: T, src: int = 0) -> T:
    """``value`` of process ``src`` on every process (a picklable object; identity without a group)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    if rank() == src:
        traffic.add("broadcast", len(pickle.dumps(value)))
    return box[0]


def barrier() -> None:
    """Wait for every process of the group (no-op without one)."""
    if world_size() > 1:
        dist.barrier()


# --------------------------------------------------------------------------------------- data mode
def batch_rows(batch: int) -> slice:
    """This process's contiguous rows of a global batch of ``batch`` rows (all of them outside data mode).

    :raises ValueError: when the batch has fewer rows than there are processes.
    """
    if mode() != "data":
        return slice(0, batch)
    size, r = world_size(), rank()
    if batch < size:
        raise ValueError(f"a batch of {batch} rows cannot be shared by {size} data-parallel processes: use batches "
                         f"of at least {size} rows")
    base, extra = divmod(batch, size)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def shard_batch(x: torch.Tensor | Mapping[str, Any], y: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """(x, y) restricted to :func:`batch_rows` (every tensor of a mapping x with the batch's rows)."""
    rows = batch_rows(y.shape[0])
    if isinstance(x, Mapping):
        return {k: v[rows] if isinstance(v, torch.Tensor) and v.shape[:1] == y.shape else v
                for k, v in x.items()}, y[rows]
    return x[rows], y[rows]


def batch_mean(tensors: Sequence[torch.Tensor], count: int) -> list[torch.Tensor]:
    """The share-weighted means Σ_r (B_r/B) t_r of shard-local batch means t_r, in one all-reduce.

    :param tensors: this process's values (any shapes; the same on every process).
    :param count: B_r, the rows of this process's shard.
    :returns: detached tensors (the inputs themselves outside data mode); the reduction runs in the tensors'
        common dtype, at least float32.
    """
    if mode() != "data":
        return list(tensors)
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors], torch.float32)
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors] +
                     [torch.ones(1, dtype=dtype, device=tensors[0].device)])
    total = _all_reduce(flat * count)
    mean = (total[:-1] / total[-1]).split([t.numel() for t in tensors])
    return [m.reshape(t.shape).to(t.dtype) for m, t in zip(mean, tensors, strict=True)]


def global_rows(count: int) -> int:
    """B = Σ_r B_r, the rows of the global batch, from this process's ``count`` = B_r (``count`` outside data
    mode; one all-reduce of a scalar)."""
    if mode() != "data":
        return count
    return int(_all_reduce(torch.tensor([float(count)], dtype=torch.float64)).item())


def average_terms(terms: Mapping[str, float], count: int) -> dict[str, float]:
    """A step's logged scalars averaged over the data-parallel shards (:func:`batch_mean`; keys sorted)."""
    if mode() != "data":
        return dict(terms)
    names = sorted(terms)
    (values,) = batch_mean([torch.tensor([float(terms[n]) for n in names], dtype=torch.float64)], count)
    return dict(zip(names, values.tolist(), strict=True))


# ----------------------------------------------------------------------------------- particle mode
def particle_rows(num_particles: int) -> slice:
    """This process's block of K/W particles in particle mode; all K otherwise.

    :raises ValueError: when K is not divisible by the number of processes.
    """
    if mode() != "particle":
        return slice(0, num_particles)
    size = world_size()
    if num_particles % size:
        raise ValueError(f"K = {num_particles} particles cannot be split evenly over {size} particle-parallel "
                         f"processes: use a multiple of {size} particles, or distributed='data'")
    block = num_particles // size
    return slice(rank() * block, (rank() + 1) * block)


def particle_processes() -> int:
    """The number of processes the particles are split over (W in particle mode, else 1)."""
    return world_size() if mode() == "particle" else 1


def loss_share() -> float:
    """The share 1/W of a global term that each process back-propagates in particle mode (else 1)."""
    return 1.0 / particle_processes()


def particle_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Σ over processes in particle mode (detached); ``tensor`` itself otherwise."""
    return _all_reduce(tensor) if mode() == "particle" else tensor


def particle_mean(rows: torch.Tensor) -> torch.Tensor:
    """The mean over all K particles of a per-particle value given for this process's rows (K/W, ...)."""
    return particle_sum(rows.detach().sum(0)) / (rows.shape[0] * particle_processes())


class _GatherParticles(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each process the sum over processes of the gradient of its rows."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        ctx.rows = local.shape[0]
        return _all_gather(local)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        start = rank() * ctx.rows
        return _all_reduce(grad)[start:start + ctx.rows]


def gather_particles(local: torch.Tensor) -> torch.Tensor:
    """All processes' particle rows (K, ...) from this process's (K/W, ...), with gradients flowing back to the
    own rows, in particle mode; ``local`` itself otherwise."""
    return _GatherParticles.apply(local) if mode() == "particle" else local


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """All processes' rows concatenated along dim 0, without gradients; ``local`` itself outside a mode."""
    return _all_gather(local) if mode() is not None else local


def reduce_gradients(params: Mapping[str, torch.Tensor], count: int, sharded: Sequence[str] = ()) -> None:
    """Make the ``.grad`` of ``params`` (by name, reduced in name order) what one process would compute.

    Data mode: every gradient becomes its :func:`batch_mean` over the shards (one all-reduce). Particle mode:
    the gradients of parameters that every process holds (all but ``sharded``, the names of parameters that
    hold only this process's particles) are summed over the processes. Parameters without a gradient are
    left alone (the computation graph is the same on every process).
    """
    current = mode()
    if current is None:
        return
    names = sorted(n for n, p in params.items() if p.grad is not None and (current == "data" or n not in sharded))
    if not names:
        return
    grads = [params[n].grad for n in names]
    if current == "data":
        reduced = batch_mean(grads, count)
    else:
        total = _all_reduce(torch.cat([g.reshape(-1) for g in grads]))
        reduced = [t.reshape(g.shape) for t, g in zip(total.split([g.numel() for g in grads]), grads, strict=True)]
    for name, value in zip(names, reduced, strict=True):
        params[name].grad.copy_(value)


# ------------------------------------------------------------------------------------- prediction
def prediction_rows(num_samples: int) -> slice:
    """This process's block of S posterior draws for prediction under a mode (S divisible by W), else all."""
    size = world_size()
    if mode() is None or num_samples % size:
        return slice(0, num_samples)
    block = num_samples // size
    return slice(rank() * block, (rank() + 1) * block)


def gather_predictions(local: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The (S, ...) predictions of all draws from this process's :func:`prediction_rows` block."""
    if prediction_rows(num_samples) == slice(0, num_samples):
        return local
    return gather_rows(local)


# ------------------------------------------------------------------------------------ randomness
@contextmanager
def independent_randomness(*modes: Mode) -> Iterator[None]:
    """Inside the block, random draws (dropout masks) differ between processes when one of ``modes`` is active.

    The block runs on a forked RNG seeded from the run's seed (``torch.initial_seed()``), a counter of such
    blocks and the rank; the global RNG state is untouched, so the processes' global streams stay in step
    (data-parallel processes must draw the same particles' noise). Elsewhere the block runs as it is.
    """
    current = mode()
    if current is None or current not in modes:
        yield
        return
    seed = (torch.initial_seed() * 0x9E3779B1 + next(_streams) * world_size() + rank()) % 2**63
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
