"""What a training forward of one network saves for backward, measured on the meta device
(:class:`NetMemory`): nothing is allocated, so a 1,000,000-class head costs nothing to
describe. The memory model (:mod:`onetrick.perf.predict.memory`) sums it with the
parameters, gradients, optimizer state and buffers of each plan."""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

__all__ = ["MMAP_MAX", "NetMemory", "Saved", "net_memory"]

MIB = 2**20
#: glibc malloc serves a block this big or bigger with mmap and returns it to the system when
#: freed; smaller blocks come from its heaps, which keep them: freed activations stay in the
#: RSS (measured: a K=1 resnet18 step at 100,000 classes ends ~70 MiB above what it holds).
MMAP_MAX = 32 * MIB


class _FakeComm:
    """What a sharded head's forward needs of a Comm, on the meta device: sizes and
    collectives that do nothing (the outputs are already allocated by the caller)."""

    def __init__(self, size: int, rank: int = 0) -> None:
        self.size, self.rank, self.wire_dtype = size, rank, torch.float32

    @contextmanager
    def exact(self):
        yield

    def _noop(self, *args, **kwargs):
        return None

    all_gather = all_reduce = reduce_scatter = broadcast = all_to_all = record = _noop


@dataclass
class Saved:
    """Tensors autograd saved for backward in one training forward, on the meta device,
    each storage once, parameters and buffers left out; plus the outputs still held."""

    total: int = 0       # bytes
    largest: int = 0     # the largest storage
    heap: int = 0        # bytes in storages under MMAP_MAX (glibc keeps them once freed)

    def __add__(self, other: Saved) -> Saved:
        return Saved(self.total + other.total, max(self.largest, other.largest), self.heap + other.heap)


def _storage(t: torch.Tensor):
    s = t.untyped_storage()
    return s._cdata, s.nbytes()


def _measure_saved(fn, exclude: set) -> Saved:
    """Run ``fn`` (a forward on meta tensors, returning the tensors it leaves alive) and
    collect what autograd saved, as :class:`Saved`."""
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            key, nbytes = _storage(t)
            if key not in exclude:
                seen[key] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        alive = fn()
    for t in alive:
        key, nbytes = _storage(t)
        if key not in exclude:
            seen[key] = nbytes
    sizes = list(seen.values())
    return Saved(sum(sizes), max(sizes, default=0), sum(n for n in sizes if n < MMAP_MAX))


def _meta_state(module: nn.Module) -> tuple[dict, set]:
    """Meta stand-ins for ``module``'s parameters and buffers (for ``functional_call``),
    and their storages (what saved-tensor accounting leaves out)."""
    state = {}
    for name, p in module.named_parameters():
        state[name] = torch.empty(p.shape, dtype=p.dtype, device="meta", requires_grad=True)
    for name, b in module.named_buffers():
        state[name] = torch.empty(b.shape, dtype=b.dtype, device="meta")
    return state, {_storage(t)[0] for t in state.values()}


def _meta_head(head: nn.Sequential) -> nn.Sequential:
    """``head`` with every Linear rebuilt on the meta device (no memory), other layers shared."""
    layers = OrderedDict()
    for name, layer in head.named_children():
        if isinstance(layer, nn.Linear):
            layer = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        layers[name] = layer
    return nn.Sequential(layers)


class NetMemory:
    """What the memory model needs of one network at one image size: its parameters
    (names and sizes, registration order), buffers, and what a training forward saves,
    measured on the meta device with ``saved_tensors_hooks`` (nothing is allocated, a
    1,000,000-class head costs nothing). The trunk may be one opaque module."""

    def __init__(self, trunk: nn.Module, head: nn.Sequential, in_shape: tuple[int, int, int], label: str = "") -> None:
        self.trunk, self.head, self.in_shape, self.label = trunk, _meta_head(head), tuple(in_shape), label
        self.trunk_params = [("trunk." + n, p.numel()) for n, p in trunk.named_parameters()]
        self.head_params = [("head." + n, p.numel()) for n, p in self.head.named_parameters()]
        self.buffers = [b.numel() * b.element_size() for b in trunk.buffers()]
        self.classes = next(m.out_features for m in reversed(self.head) if isinstance(m, nn.Linear))
        self._cache: dict = {}

    @classmethod
    def from_model(cls, model: nn.Module, image_size: int, channels: int = 3, label: str = "") -> NetMemory:
        """From a :class:`~onetrick.models.TrunkHeadNet`, real or on the meta device."""
        return cls(model.trunk, model.head, (channels, image_size, image_size), label)

    @property
    def params(self) -> list[tuple[str, int]]:
        return self.trunk_params + self.head_params

    def cut_index(self, cut: int) -> int:
        linears = [i for i, m in enumerate(self.head) if isinstance(m, nn.Linear)]
        if not 0 <= cut < len(linears):
            raise ValueError(f"cut {cut} outside the head's {len(linears)} Linear layers")
        return linears[cut]

    def split(self, cut: int) -> tuple[list[tuple[str, int]], nn.Sequential]:
        """Parameters of the data-parallel side (trunk and the head before ``cut``) and the
        model-parallel rest of the head."""
        at = self.cut_index(cut)
        before = {f"head.{n}" for i, (n, _) in enumerate(self.head.named_children()) if i < at}
        side = self.trunk_params + [(n, c) for n, c in self.head_params if n.rsplit(".", 1)[0] in before]
        return side, self.head[at:]

    def features(self, cut: int = 0) -> int:
        """Width of the activations at the cut (the trunk's flattened output at cut 0)."""
        return self.head[self.cut_index(cut)].in_features

    def sharded(self, cut: int, k: int):
        """Worker 0's shard over K workers (the largest: DTensor's layout) of the head after
        the cut, on the meta device."""
        from onetrick.distributed.tensor_parallel import ShardedHead

        key = ("sharded", cut, k)
        if key not in self._cache:
            self._cache[key] = ShardedHead(self.split(cut)[1], _FakeComm(k))
        return self._cache[key]

    def trunk_saved(self, n: int, cut: int = 0) -> Saved:
        """A training forward of the data-parallel side (trunk, then the head before the
        cut) at ``n`` examples."""
        key = ("trunk", n, cut)
        if key not in self._cache:
            state, exclude = _meta_state(self.trunk)
            at = self.cut_index(cut)
            pre = self.head[:at]
            pre_state, pre_ex = _meta_state(pre)

            def run():
                x = torch.empty((n, *self.in_shape), device="meta")
                was = self.trunk.training
                self.trunk.train()
                try:
                    out = torch.flatten(torch.func.functional_call(self.trunk, state, (x,)), 1)
                finally:
                    self.trunk.train(was)
                if at:
                    out = torch.func.functional_call(pre.train(), pre_state, (out,))
                return [out]

            self._cache[key] = _measure_saved(run, exclude | pre_ex)
        return self._cache[key]

    def head_saved(self, n: int, k: int = 1, cut: int = 0) -> Saved:
        """A training forward of the head after the cut and its loss at ``n`` examples:
        dense (``k`` = 1, the cross-entropy on the logits) or worker 0's shard of K (the
        sharded head's forward and its loss), with the logits it leaves alive."""
        key = ("head", n, k, cut)
        if key not in self._cache:
            import torch.nn.functional as F

            _, rest = self.split(cut)
            head = rest.train() if k == 1 else self.sharded(cut, k).train()
            exclude = {_storage(p)[0] for p in head.parameters()}
            width = next(m.in_features for m in rest if isinstance(m, nn.Linear))

            def run():
                x = torch.empty(n, width, device="meta", requires_grad=True)
                targets = torch.zeros(n, dtype=torch.long, device="meta")
                out = head(x)
                if k == 1 or head.row_wise:
                    loss = F.cross_entropy(out.float(), targets)
                else:
                    from onetrick.distributed.tensor_parallel import sharded_loss_and_errors

                    loss, _ = sharded_loss_and_errors(out, targets, head.class_offset, head.comm)
                return [out, loss]

            self._cache[key] = _measure_saved(run, exclude)
        return self._cache[key]


@lru_cache(maxsize=16)
def net_memory(model: str, classes: int, channels: int, image_size: int, dropout: float = 0.5) -> NetMemory:
    """:class:`NetMemory` of a named model, built on the meta device (cached)."""
    from onetrick.models import meta_model

    return NetMemory.from_model(meta_model(model, num_classes=classes, in_channels=channels, dropout=dropout),
                                image_size, channels, model)
