"""K LoRA particles in one pass over one copy of the frozen network (multi-LoRA batching).

Particle k is the frozen network plus its own low-rank updates, read from row k of θ (K, D). The fused pass
lays the K copies of a batch out particle-major, row ``k·B' + b`` for example ``b`` of particle ``k``, and
every adapted Linear-type layer computes (Hu et al. 2022, eq. 3, with one update per particle)

    y = base(x) + s · (drop(x_k) A_kᵀ B_kᵀ + β_k)        on the rows x_k of particle k,

where ``base`` runs ONCE on all K·B' rows it receives and is a black box (a plain ``Linear``, GPT-2's
``Conv1D``, a quantized layer: its weight is never read, so one copy of every frozen tensor exists), and the
low-rank part is two batched matmuls over the views A (K, r, in), B (K, out, r) of θ, the second accumulating
into base(x); s = α/r (α/√r with rsLoRA) scales B, after the down-projection as in peft; β_k is lora_B's bias
(peft's ``lora_bias``, else 0). A trained Linear head (peft ``modules_to_save``) computes ``x_k W_kᵀ + b_k``
the same way. LoRA dropout draws its mask on every row, so it is independent per particle. This is the
batching of many LoRA adapters over one base model that multi-LoRA servers use (Punica, Chen et al. 2023;
S-LoRA, Sheng et al. 2023), here with gradients, for the particles of one posterior.

Where the particles join the batch: at the first block holding an adapter of θ, found in the model's block
list (a ``ModuleList``/``Sequential`` named ``blocks`` (timm), ``layers``/``layer`` (HF decoders, BERT) or
``h`` (GPT-2)), a forward pre-hook repeats the block's hidden state and every per-example side input K times
(tensors with ≥ 2 dims whose leading dim is the hidden state's B': attention masks, position ids, rotary
embeddings); later blocks get their side inputs repeated too. Everything before that block (patch or token
embeddings, frozen early blocks) runs once per batch. Without a recognisable block list, when an adapter of
θ is registered before it, or when the network trains with dropout before it (the particles would share its
masks), the inputs themselves are repeated. An adapted layer or head reached by rows that are not the K·B'
particle rows raises :class:`Unfusable` instead of computing garbage.

Limits: inside the expanded blocks the leading dimension must stay the example dimension (a model that folds
tokens into it, or reads B from its input to reshape, is caught by the row checks); 1-D side inputs are not
repeated (e.g. ``cache_position``); dropout written as a function in the prefix (not a module) cannot be seen,
and its masks are then shared by the particles; LoRA on Conv/Embedding layers and variants (DoRA) are not
batched (the caller falls back to the per-particle loop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

#: Attribute names of the block lists where particles join the batch (timm, HF decoders, BERT, GPT-2).
BLOCK_LISTS = ("blocks", "layers", "layer", "h")


class Unfusable(RuntimeError):
    """The fused particle pass does not apply to this network, adapter state or input; the message says why."""


@dataclass(frozen=True)
class _Lora:
    """A peft LoRA layer whose factors (for ``adapters``) are entries of θ."""

    name: str
    module: nn.Module
    adapters: tuple[str, ...]


@dataclass(frozen=True)
class _Head:
    """A peft ``modules_to_save`` wrapper around a Linear head whose trained copy is in θ."""

    name: str
    module: nn.Module
    adapter: str


@dataclass(frozen=True)
class FusedPlan:
    """What the fused pass swaps and where particles join the batch.

    :ivar blocks: the blocks from the first one holding an adapter of θ to the end of the block list; empty
        when the inputs are repeated instead.
    :ivar prefix_dropouts: dropout modules registered before ``blocks`` (their masks would be shared by the
        particles: while one is active in training, the inputs are repeated instead).
    :ivar expand_at_input_because: why the inputs are repeated (None when ``blocks`` is used).
    """

    loras: tuple[_Lora, ...]
    heads: tuple[_Head, ...]
    blocks: tuple[nn.Module, ...]
    prefix_dropouts: tuple[nn.Module, ...]
    expand_at_input_because: str | None


def _factor_names(name: str, adapter: str) -> set[str]:
    """The parameter names of one adapter's LoRA factors in the layer ``name``."""
    return {f"{name}.{part}.{adapter}.{p}" for part in ("lora_A", "lora_B") for p in ("weight", "bias")}


def _head_names(name: str, adapter: str) -> set[str]:
    return {f"{name}.modules_to_save.{adapter}.{p}" for p in ("weight", "bias")}


def _lora_layer(name: str, module: nn.Module, names: set[str]) -> _Lora | None:
    """The adapters of ``module`` whose factors θ holds; raise when such a layer cannot run fused."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return None
    adapters = tuple(a for a in module.lora_A if _factor_names(name, a) & names)
    if not adapters:
        return None
    for adapter in adapters:
        if not (isinstance(module.lora_A[adapter], nn.Linear) and isinstance(module.lora_B[adapter], nn.Linear)):
            raise Unfusable(f"LoRA layer '{name}' adapts a {type(module.get_base_layer()).__name__}; the fused pass "
                            "handles Linear-type layers (Linear, Conv1D, quantized Linear) only")
        if adapter in getattr(module, "lora_variant", {}):
            variant = type(module.lora_variant[adapter]).__name__
            raise Unfusable(f"LoRA layer '{name}' uses the variant {variant} (e.g. DoRA); the fused pass runs "
                            "plain LoRA")
    return _Lora(name, module, adapters)


def _head(name: str, module: nn.Module, names: set[str]) -> _Head | None:
    from peft.utils.other import ModulesToSaveWrapper

    if not isinstance(module, ModulesToSaveWrapper):
        return None
    owned = [a for a in module.modules_to_save if _head_names(name, a) & names]
    if not owned:
        return None
    if len(owned) > 1:
        raise Unfusable(f"θ holds several adapters {owned} of the head '{name}'")
    head = module.modules_to_save[owned[0]]
    if not isinstance(head, nn.Linear):
        raise Unfusable(f"the trained head '{name}' is a {type(head).__name__}; the fused pass runs Linear heads only")
    return _Head(name, module, owned[0])


def _claimed(lora: _Lora | None, head: _Head | None) -> set[str]:
    if lora is not None:
        return set().union(*(_factor_names(lora.name, a) for a in lora.adapters))
    return _head_names(head.name, head.adapter) if head is not None else set()


def _block_list(modules: list[tuple[str, nn.Module]], owners: list[str]) -> tuple[str, nn.Module, int] | None:
    """(name, block list, index of the first block holding an adapter of θ), outermost list first."""
    for name, module in modules:
        if not isinstance(module, nn.ModuleList | nn.Sequential) or name.rsplit(".", 1)[-1] not in BLOCK_LISTS:
            continue
        for index, (child, _) in enumerate(module.named_children()):
            block = f"{name}.{child}"
            if any(owner == block or owner.startswith(f"{block}.") for owner in owners):
                return name, module, index
    return None


def plan_fused(net: nn.Module, names: tuple[str, ...]) -> FusedPlan:
    """Find the LoRA layers and heads that hold the θ entries ``names`` and where particles join the batch.

    :raises Unfusable: when an entry of θ is neither a factor of a Linear-type LoRA layer nor a trained Linear
        head, or a LoRA layer uses a variant (DoRA, ...).
    """
    wanted = set(names)
    modules = list(net.named_modules())
    loras, heads, claimed = [], [], set()
    for name, module in modules:
        lora, head = _lora_layer(name, module, wanted), _head(name, module, wanted)
        loras += [lora] if lora else []
        heads += [head] if head else []
        claimed |= _claimed(lora, head)
    unclaimed = [n for n in names if n not in claimed]
    if unclaimed:
        raise Unfusable(f"θ holds {unclaimed[0]!r}, which is neither a factor of a peft LoRA Linear layer nor a "
                        "trained Linear head (modules_to_save)")
    owners = [entry.name for entry in (*loras, *heads)]
    found = _block_list(modules, owners)
    if found is None:
        return FusedPlan(tuple(loras), tuple(heads), (), (), f"no block list ({', '.join(BLOCK_LISTS)}) has adapters")
    list_name, block_list, first = found
    order = {name: i for i, (name, _) in enumerate(modules)}
    early = [o for o in owners if order[o] < order[list_name]]
    if early:
        return FusedPlan(tuple(loras), tuple(heads), (), (), f"the adapter '{early[0]}' precedes the block list")
    before = [m for name, m in modules if order[name] < order[list_name]]
    before += [m for block in list(block_list)[:first] for m in block.modules()]
    dropouts = tuple(m for m in before if isinstance(m, nn.modules.dropout._DropoutNd))
    return FusedPlan(tuple(loras), tuple(heads), tuple(list(block_list)[first:]), dropouts, None)


def _repeat_rows(value: Any, rows: int, k: int, memo: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 min_dim: int) -> Any:
    """Repeat K times (particle-major) every tensor in ``value`` with ``rows`` leading rows and ≥ ``min_dim`` dims.

    ``memo`` maps ``id(tensor)`` to (tensor, its repetition), so a tensor handed to several blocks (a mask) is
    repeated once; it holds the tensor itself, so no other tensor can take its ``id`` while the pass runs.
    With K = 1 the repetition is the tensor itself."""
    if isinstance(value, torch.Tensor):
        if k == 1 or value.dim() < min_dim or value.shape[0] != rows:
            return value
        if id(value) not in memo:
            memo[id(value)] = (value, value.repeat(k, *([1] * (value.dim() - 1))))
        return memo[id(value)][1]
    if isinstance(value, tuple | list):
        return type(value)(_repeat_rows(v, rows, k, memo, min_dim) for v in value)
    if isinstance(value, Mapping):
        return {key: _repeat_rows(v, rows, k, memo, min_dim) for key, v in value.items()}
    return value


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)


class _Pass:
    """One fused call: K particles, their θ views, and whether the rows have been expanded yet."""

    def __init__(self, params: Mapping[str, torch.Tensor], k: int) -> None:
        self.params = params
        self.k = k
        self.rows: int | None = None  # B', the rows of one particle where the particles joined the batch
        self.memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def expand(self, rows: int, value: Any, min_dim: int) -> Any:
        if self.rows is None:
            self.rows = rows
        return _repeat_rows(value, self.rows, self.k, self.memo, min_dim)

    def block_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.rows is None:
            hidden = _first_tensor(args, kwargs)
            if hidden is None or hidden.dim() == 0:
                raise Unfusable(f"the block {type(module).__name__} receives no batched tensor to expand")
            self.rows = hidden.shape[0]
        return self.expand(self.rows, args, 2), self.expand(self.rows, kwargs, 2)

    def check_rows(self, name: str, x: torch.Tensor) -> None:
        if self.rows is None or x.shape[0] != self.k * self.rows:
            expected = ("before the particles joined the batch" if self.rows is None
                        else f"(expected {self.k}·{self.rows})")
            raise Unfusable(f"'{name}' received {x.shape[0]} rows {expected}: the fused pass needs the particles "
                            "in the leading (batch) dimension of every adapted layer's input")

    def param(self, name: str, fallback: torch.Tensor | None) -> torch.Tensor | None:
        """θ's view (K, ...) of ``name``, else the module's own tensor expanded over the K particles (or None)."""
        if name in self.params:
            return self.params[name]
        return None if fallback is None else fallback.expand(self.k, *fallback.shape)

    def lora_forward(self, entry: _Lora, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = entry.module
        if layer.merged:
            raise Unfusable(f"the adapters of '{entry.name}' are merged into its base weights")
        result = layer.base_layer(x, *args, **kwargs)
        if layer.disable_adapters:
            return result
        self.check_rows(entry.name, x)
        for adapter in layer.active_adapters:
            if adapter not in entry.adapters:
                if adapter in layer.lora_A:
                    raise Unfusable(f"the active adapter {adapter!r} of '{entry.name}' is not in θ")
                continue
            lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
            a = self.param(f"{entry.name}.lora_A.{adapter}.weight", lora_a.weight)  # (K, r, in)
            b = self.param(f"{entry.name}.lora_B.{adapter}.weight", lora_b.weight)  # (K, out, r)
            bias = self.param(f"{entry.name}.lora_B.{adapter}.bias", lora_b.bias)  # (K, out) or None
            h = layer.lora_dropout[adapter](x)
            if not torch.is_autocast_enabled(h.device.type):
                h = h.to(a.dtype)
            h = h.reshape(self.k, -1, h.shape[-1])  # (K, M, in), M = B'·(tokens)
            scaling = layer.scaling[adapter]
            down = torch.matmul(h, a.transpose(-1, -2))  # (K, M, r), as peft's lora_A
            up = (b * scaling).transpose(-1, -2)  # (K, r, out): s scales the small factor, after the down-projection
            base = result.reshape(self.k, -1, result.shape[-1])  # (K, M, out)
            if base.dtype == down.dtype:  # one batched matmul accumulating into the base output: no full-size
                total = torch.baddbmm(base, down, up)  # temporaries for product, scaling, sum (peft makes three)
            else:  # the base output keeps its own dtype (e.g. float32 from a quantized layer under autocast)
                total = base + torch.matmul(down, up).to(base.dtype)
            if bias is not None:
                total = total + (bias * scaling).unsqueeze(1).to(total.dtype)
            result = total.reshape(result.shape)
        return result

    def head_forward(self, entry: _Head, x: torch.Tensor) -> torch.Tensor:
        wrapper = entry.module
        if wrapper.disable_adapters or list(wrapper.active_adapters) != [entry.adapter]:
            raise Unfusable(f"the head '{entry.name}' does not run its trained adapter {entry.adapter!r} alone")
        self.check_rows(entry.name, x)
        head = wrapper.modules_to_save[entry.adapter]
        weight = self.param(f"{entry.name}.modules_to_save.{entry.adapter}.weight", head.weight)  # (K, C, h)
        bias = self.param(f"{entry.name}.modules_to_save.{entry.adapter}.bias", head.bias)  # (K, C) or None
        out = torch.matmul(x.reshape(self.k, -1, x.shape[-1]), weight.transpose(-1, -2))  # (K, M, C)
        if bias is not None:  # in the matmul's dtype, as nn.Linear under autocast
            out = out + bias.unsqueeze(1).to(out.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])


@contextmanager
def _swapped_forward(module: nn.Module, forward: Callable) -> Iterator[None]:
    """Replace ``module.forward`` inside the block, restoring whatever instance attribute was there."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


class FusedParticles:
    """Logits of K particles in one pass: ``(params {name: (K, ...)}, inputs with B rows) → (K, B, ...)``.

    :param net: the peft model; ``names`` the θ entries (``ParamSpec.names``).
    :raises Unfusable: at construction when the network has θ entries the pass cannot batch, or at a call
        whose rows do not reach the adapted layers as K·B' particle rows.
    """

    def __init__(self, net: nn.Module, names: tuple[str, ...]) -> None:
        self.net = net
        self.plan = plan_fused(net, names)

    def expands_at_input(self) -> str | None:
        """Why this call repeats the inputs rather than a block's input (None: at the first adapted block)."""
        plan = self.plan
        if plan.expand_at_input_because is not None:
            return plan.expand_at_input_because
        if self.net.training and any(m.training and m.p > 0 for m in plan.prefix_dropouts):
            return "the network trains with dropout before the first adapted block"
        return None

    def __call__(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor | Mapping[str, torch.Tensor],
                 num_rows: int, call: Callable[[Any], Any]) -> Any:
        """``call(inputs)`` with the K = first-dim-of-``params`` particles batched; ``num_rows`` is B.

        Returns the network's output, whose leading dimension holds the K·B particle rows.
        """
        k = next(iter(params.values())).shape[0]
        state = _Pass(params, k)
        with ExitStack() as stack:
            for lora in self.plan.loras:
                stack.enter_context(_swapped_forward(lora.module, partial(state.lora_forward, lora)))
            for head in self.plan.heads:
                stack.enter_context(_swapped_forward(head.module, partial(state.head_forward, head)))
            if self.expands_at_input() is None:
                for block in self.plan.blocks:
                    stack.enter_context(block.register_forward_pre_hook(state.block_hook, with_kwargs=True))
            else:
                inputs = state.expand(num_rows, inputs, 1)
            return call(inputs)
