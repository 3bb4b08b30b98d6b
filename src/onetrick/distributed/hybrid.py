"""The paper's hybrid ("one weird trick"): data parallelism in the convolutional trunk,
model parallelism in the fully-connected head.

Each worker runs the trunk on its own B examples. The last-conv activations reach the
neuron-sharded head by one of three schemes (docs/PAPER.md, "The hybrid's three schemes"):

* (a) all-gather: the head runs once on all K*B examples; the activation gradients
  are reduce-scattered back to their owners.
* (b) K rounds: in round j worker j's B activations are broadcast and every worker runs
  its head slice forward and backward on them, while round j+1's broadcast is already in
  flight; after the last round one reduce-scatter returns every round's activation
  gradient to its owner.
* (c) an all-to-all first gives every worker B/K examples from each worker, then as (b),
  so every round mixes all workers' examples.

``--fc-batch full`` updates the head once per step from all K*B examples: exactly
synchronous SGD with batch K*B. ``--fc-batch worker`` (schemes b, c) updates the head
after every round, K times per step, at the one-worker learning rate, "as though you
have a small batch size" for ~90% of the weights. The trunk's gradients are then those
of the mean loss over all K*B examples (each round's activation gradients count 1/K).

``--cut N`` moves the cut: the first N FC layers of the head run with the trunk, on each
worker's own examples, their weights synchronised with the trunk's, and the activations
at the cut are what the schemes move (:mod:`onetrick.distributed.cut`; N=0 is the paper's
cut, before fc6). Below, "trunk" means the data-parallel side of the cut.

Trunk gradients are synchronised with the paper's sharded update (reduce-scatter, owner
applies SGD, all-gather; :class:`~onetrick.distributed.data_parallel.ShardedDataParallel`).
"""
from __future__ import annotations

import torch

from onetrick.config import TrainConfig
from onetrick.distributed.cut import split_at_cut
from onetrick.distributed.data_parallel import ShardedDataParallel, broadcast_buffers
from onetrick.distributed.model_parallel import ShardedHeadStrategy
from onetrick.distributed.runtime import Runtime
from onetrick.distributed.strategy import StepOutput
from onetrick.distributed.tensor_parallel import TAG, all_to_all_rows, gather_rows
from onetrick.models import TrunkHeadNet


class Hybrid(ShardedHeadStrategy):
    name = "hybrid"

    def __init__(self, model: TrunkHeadNet, cfg: TrainConfig, rt: Runtime) -> None:
        # From here on self.model.trunk is the data-parallel side of the cut (trunk and the
        # first cfg.cut FC layers) and self.model.head the model-parallel rest.
        super().__init__(split_at_cut(model, cfg.cut), cfg, rt)
        self.scheme = cfg.scheme or "b"
        self.per_round = cfg.fc_batch == "worker"
        # (K*B, B): the head keeps the one-worker rate; the trunk follows --lr-scale.
        head_lr = cfg.lr if self.per_round else self.base_lr()
        self.trunk_sync = ShardedDataParallel(self.model, cfg, rt, module=self.model.trunk,
                                              lr=self.base_lr(), average=self.per_round)
        self.trunk_sync.comm = self.comm
        self.head_opt = self.head_optimizer(head_lr)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.trunk_sync.optimizer, self.head_opt]

    # -- one step -------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        self.head_opt.zero_grad(set_to_none=True)
        broadcast_buffers(self.model.trunk, self.comm)  # BatchNorm's running statistics: worker 0's (data_parallel.py)
        feats = self.model.features(images)
        if self.scheme == "a":
            loss, errors = self._scheme_a(feats, targets)
        else:
            loss, errors = self._rounds(feats, targets)
        finite = torch.isfinite(loss)  # the same on every worker: computed from the same numbers
        self.trunk_sync.sync_and_step(finite)
        if not self.per_round:
            self.step(self.head_opt, finite)
        count = len(targets) * self.comm.size
        return StepOutput(loss * count, errors, count=count, finite=finite)

    def _scheme_a(self, feats: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        every_target = self._gather_targets(targets).flatten()
        loss, errors = self.loss_and_errors(self.head(gather_rows(feats, self.comm)), every_target)
        loss.backward()  # reduce-scatter returns each worker the gradient of its rows
        return loss.detach(), errors

    def _rounds(self, feats: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Schemes (b) and (c): K rounds, next broadcast in flight during each round.

        A round carries only what it needs: its activations, the head's own exchanges and
        the loss's. Labels move once per step; loss and errors stay on the device; the
        activation gradients of all rounds return to their owners in one reduce-scatter
        (the owner's trunk backward cannot start before the last round anyway: the last
        round's owner sets the pace of the trunk's gradient sync)."""
        k, rank = self.comm.size, self.comm.rank
        own = feats if self.scheme == "b" else all_to_all_rows(feats, self.comm)
        round_targets = self._round_targets(targets)              # (K, B): round j's labels
        acts = [own.detach() if j == rank else torch.empty_like(own) for j in range(k)]
        inflight = {0: self.comm.broadcast(acts[0], src=0, tag=TAG, async_op=True)}
        grads, losses, errors = [], [], []
        for j in range(k):
            if j + 1 < k:  # overlap: round j+1's activations travel while round j computes
                inflight[j + 1] = self.comm.broadcast(acts[j + 1], src=j + 1, tag=TAG, async_op=True)
            self.comm.wait(inflight.pop(j))
            x = acts[j].requires_grad_()
            loss, errs = self.loss_and_errors(self.head(x), round_targets[j])
            (loss if self.per_round else loss / k).backward()
            grads.append(x.grad)
            losses.append(loss.detach())
            errors.append(errs)
            if self.per_round:
                self.step(self.head_opt, torch.isfinite(loss.detach()))
                self.head_opt.zero_grad(set_to_none=True)
        own_grad = torch.empty_like(own)  # sum over workers of the partial gradients of my round
        self.comm.reduce_scatter(own_grad, torch.cat(grads), tag=TAG)
        own.backward(own_grad)  # through the all-to-all (c) and the trunk
        return torch.stack(losses).mean(), torch.stack(errors).sum()

    def _gather_targets(self, targets: torch.Tensor) -> torch.Tensor:
        out = targets.new_empty(self.comm.size * targets.numel())
        self.comm.all_gather(out, targets.contiguous(), tag="labels")
        return out.view(self.comm.size, -1)

    def _round_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Row j: the labels of round j's examples, from one all-gather of every worker's.
        Scheme (c)'s round j holds the j-th B/K chunk of each worker's rows, in worker order
        (what :func:`all_to_all_rows` delivers)."""
        every = self._gather_targets(targets)                      # (K, B), row r from worker r
        if self.scheme == "b":
            return every
        k = self.comm.size
        return every.view(k, k, -1).transpose(0, 1).reshape(k, -1)

    def set_training(self, mode: bool) -> None:
        if not mode:
            broadcast_buffers(self.model.trunk, self.comm)
        super().set_training(mode)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation by scheme (a): the same function whatever the training scheme."""
        every = self.full_logits(self._head_of_all(images))
        return every.view(self.comm.size, len(images), -1)[self.comm.rank]

    @torch.no_grad()
    def top_classes(self, images: torch.Tensor, k: int = 5, views: int = 1) -> torch.Tensor:
        top = self.top_of_head(self._head_of_all(images), k, views)   # every worker's examples, in worker order
        return top.view(self.comm.size, -1, top.shape[-1])[self.comm.rank]

    def _head_of_all(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(gather_rows(self.model.features(images), self.comm))

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.model.trunk.named_parameters()) + self.head_params   # DataSide: the whole model's names

    # -- state ------------------------------------------------------------------------
    # The data-parallel side's names are the whole model's (DataSide): "trunk.…", and
    # "head.<i>.…" for FC layers before the cut.
    def state_dict(self) -> dict:
        trunk_w = dict(self.model.trunk.state_dict())
        trunk_m = self.trunk_sync.momentum_state()
        head_w, head_m = self.head_state(self.head_opt)
        self.comm.take()
        return {"model": {**trunk_w, **head_w}, "momentum": {**trunk_m, **head_m}}

    def load_state_dict(self, state: dict) -> None:
        model = state["model"]
        self.model.trunk.load_state_dict({k: model[k] for k in self.model.trunk.state_dict()})
        self.trunk_sync.load_momentum_state(state["momentum"])
        self.load_head_state(state["model"], state["momentum"], self.head_opt)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        trunk = {k: v.detach().clone() for k, v in self.model.trunk.state_dict().items()}
        return {**trunk, **self.dense_head_state()}
