"""Model parallelism (docs/PAPER.md form 4): every worker sees the same examples and owns
1/K of the neurons of every fully-connected layer; workers exchange activations, so
messages grow with neurons x batch, not with weights.

The trunk is replicated (every worker computes it on the same examples; its gradient
arrives whole through an all-reduce of the head's partial input gradients), except for
the two-tower ``alexnet2012`` at K=2, where worker i runs tower i and the towers
exchange activations only where the 2012 network connects them (conv3 and the FC
layers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard

from onetrick.config import TrainConfig
from onetrick.distributed.runtime import Runtime
from onetrick.distributed.strategy import StepOutput, Strategy, top_k_classes
from onetrick.distributed.tensor_parallel import (
    ShardedHead,
    gather_columns,
    replicated_input,
    shard_range,
    sharded_loss_and_errors,
    sharded_top_classes,
)
from onetrick.models import TrunkHeadNet
from onetrick.recipe import make_sgd, param_groups


class ShardedHeadStrategy(Strategy):
    """Shared by model parallelism and the hybrid: a :class:`ShardedHead` in place of the
    dense head, and the canonical (dense) state assembled from the shards."""

    def __init__(self, model: TrunkHeadNet, cfg: TrainConfig, rt: Runtime) -> None:
        super().__init__(model, cfg, rt)
        dense = self.model.head
        self.head = ShardedHead(dense, self.comm)
        self.model.head = self.head
        # Only the shard is kept: the dense layers go to the meta device, so whatever else
        # holds them (the whole model behind the hybrid's cut view, a caller's reference)
        # holds no copy of a head that can be 24 GB.
        dense.to("meta")
        self.head_params = [("head." + self.head.local_to_dense()[n], p) for n, p in self.head.named_parameters()]

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        return [("trunk." + n, p) for n, p in self.model.trunk.named_parameters()] + self.head_params

    def head_optimizer(self, lr: float) -> torch.optim.SGD:
        return make_sgd(param_groups(self.head_params, self.cfg, lr), self.cfg)

    def full_logits(self, head_out: torch.Tensor) -> torch.Tensor:
        """All classes' logits from what the head returned (already whole if row-wise)."""
        if self.head.row_wise:
            return head_out
        return gather_columns(head_out, self.comm, self.head.widths[-1], "eval")

    def top_of_head(self, head_out: torch.Tensor, k: int, views: int) -> torch.Tensor:
        """:meth:`Strategy.top_classes` from what the head returned: the full logits if
        row-wise, else this worker's classes, merged by :func:`sharded_top_classes`."""
        if self.head.row_wise:
            return top_k_classes(head_out, k, views)
        return sharded_top_classes(head_out, k, views, self.head.class_offset, sum(self.head.widths[-1]), self.comm)

    def loss_and_errors(self, head_out: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss (differentiable) and top-1 errors, as device tensors (no host read)."""
        if self.head.row_wise:  # every worker holds the full logits: no communication
            return F.cross_entropy(head_out.float(), targets), (head_out.detach().argmax(1) != targets).sum()
        return sharded_loss_and_errors(head_out, targets, self.head.class_offset, self.comm)

    # -- state ------------------------------------------------------------------------
    def head_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Head weights and momentum as DTensors sharded as the head splits them
        (``Shard(0)`` by neurons; a row-wise classifier's weight ``Shard(1)``, its bias
        ``Replicate``): each worker writes only its own shard to the checkpoint, and DCP
        reshards on load (also between layouts: the dense names and shapes are the same)."""
        weights, moms = {}, {}
        for name, p in self.head.named_parameters():
            key = "head." + self.head.local_to_dense()[name]
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            weights[key] = self._as_dtensor(p.detach(), name)
            moms[key] = self._as_dtensor(buf.detach() if buf is not None else torch.zeros_like(p), name)
        return weights, moms

    def _as_dtensor(self, local: torch.Tensor, name: str) -> DTensor:
        dim = self.head.split_dim(name)
        shape = self.head.dense_shape(name, local)
        return DTensor.from_local(local, self.rt.mesh, [Replicate() if dim is None else Shard(dim)], run_check=False,
                                  shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())

    def dense_head_state(self) -> dict[str, torch.Tensor]:
        """Head weights gathered into dense tensors on every worker."""
        local = {n: p.detach() for n, p in self.head.named_parameters()}
        with torch.no_grad():
            return {"head." + k: v for k, v in self.head.gather_dense(local).items()}

    def load_head_state(self, model: dict, momentum: dict, optimizer: torch.optim.Optimizer) -> None:
        """Accepts this worker's DTensor shards (what DCP loads into) or dense tensors."""
        dense_names = self.head.local_to_dense()
        with torch.no_grad():
            for name, p in self.head.named_parameters():
                key = "head." + dense_names[name]
                p.copy_(self._local_part(model[key], name))
                optimizer.state[p]["momentum_buffer"] = self._local_part(momentum[key], name).to(p.device).clone()

    def _local_part(self, value: torch.Tensor, name: str) -> torch.Tensor:
        if isinstance(value, DTensor):
            return value.to_local()
        dim = self.head.split_dim(name)
        if dim is None:
            return value
        start, end = shard_range(value.shape[dim], self.comm.size, self.comm.rank)
        return value.narrow(dim, start, end - start)


class ModelParallel(ShardedHeadStrategy):
    name = "model"

    def __init__(self, model: TrunkHeadNet, cfg: TrainConfig, rt: Runtime) -> None:
        super().__init__(model, cfg, rt)
        towers = getattr(self.model.trunk, "towers", None)
        self.tower_parallel = towers is not None and len(towers) == self.comm.size
        if self.tower_parallel:
            self.tower = towers[self.comm.rank]
            trunk_params = [(f"trunk.towers.{self.comm.rank}.{n}", p) for n, p in self.tower.named_parameters()]
        else:
            trunk_params = [("trunk." + n, p) for n, p in self.model.trunk.named_parameters()]
        self.trunk_params = trunk_params
        lr = self.base_lr()
        self.optimizer = make_sgd(param_groups(trunk_params + self.head_params, cfg, lr), cfg)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The full last-conv features on every worker, with a backward that sums the
        head's partial input gradients."""
        if not self.tower_parallel:
            return replicated_input(self.model.features(images), self.comm)
        a = self.tower.stage1(images)
        n, c, h, w = a.shape
        a = gather_columns(a.flatten(1), self.comm, [c * h * w] * self.comm.size).view(n, -1, h, w)
        b = self.tower.stage2(a).flatten(1)
        return gather_columns(b, self.comm, [b.shape[1]] * self.comm.size)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        self.optimizer.zero_grad(set_to_none=True)
        loss, errors = self.loss_and_errors(self.head(self.features(images)), targets)
        loss.backward()
        finite = torch.isfinite(loss.detach())
        self.step(self.optimizer, finite)
        return StepOutput(loss.detach() * len(targets), errors, count=len(targets), finite=finite)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.full_logits(self.head(self.features(images)))

    @torch.no_grad()
    def top_classes(self, images: torch.Tensor, k: int = 5, views: int = 1) -> torch.Tensor:
        return self.top_of_head(self.head(self.features(images)), k, views)

    # -- state ------------------------------------------------------------------------
    def _trunk_state(self) -> tuple[dict, dict]:
        """Trunk weights and buffers (BatchNorm's running statistics: the same on every
        worker, which all see the same examples), and the weights' momentum."""
        weights = {"trunk." + name: t.detach().clone() for name, t in self.model.trunk.state_dict().items()}
        moms = {"trunk." + name: torch.zeros_like(p) for name, p in self.model.trunk.named_parameters()}
        for key, p in self.trunk_params:
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                moms[key] = buf.detach().clone()
        if self.tower_parallel:  # each tower's owner has the truth: broadcast it
            for key in weights:
                owner = int(key.split(".")[2])
                self.comm.broadcast(weights[key], src=owner, tag="checkpoint")
                if key in moms:
                    self.comm.broadcast(moms[key], src=owner, tag="checkpoint")
        return weights, moms

    def state_dict(self) -> dict:
        trunk_w, trunk_m = self._trunk_state()
        head_w, head_m = self.head_state(self.optimizer)
        self.comm.take()
        return {"model": {**trunk_w, **head_w}, "momentum": {**trunk_m, **head_m}}

    def load_state_dict(self, state: dict) -> None:
        trunk = {k[len("trunk."):]: v for k, v in state["model"].items() if k.startswith("trunk.")}
        self.model.trunk.load_state_dict(trunk)
        for key, p in self.trunk_params:
            self.optimizer.state[p]["momentum_buffer"] = state["momentum"][key].to(p.device).clone()
        self.load_head_state(state["model"], state["momentum"], self.optimizer)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        trunk_w, _ = self._trunk_state()
        return {**trunk_w, **self.dense_head_state()}
