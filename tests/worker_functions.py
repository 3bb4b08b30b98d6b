"""Worker functions and single-process references shared by the multi-process tests.

Worker functions live here (importable by spawned workers); each runs on every worker
via ``onetrick.distributed.runtime.launch`` and returns plain tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from onetrick.config import TrainConfig
from onetrick.distributed import parallelize
from onetrick.models import TrunkHeadNet, fc_head
from onetrick.recipe import model_sgd

CLASSES = 5         # K=4: classes 2/2/1/0, so worker 3 owns no class (an empty shard)
HIDDEN = (50, 30)   # uneven for K=4: shards 13/13/13/11 and 8/8/8/6; 5 <= 30 classes: row-wise classifier
NARROW = (50, 3)    # 5 > 3 classes: the classifier is split by classes (and hidden 3 over K=4: 1/1/1/0)


def tiny_model(hidden=HIDDEN, classes=CLASSES) -> TrunkHeadNet:
    """Conv trunk + FC head with the paper's shape, small enough for many processes."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    return TrunkHeadNet(trunk, fc_head(8 * 4 * 4, hidden, classes, dropout=0.0))


def base_config(**changes) -> TrainConfig:
    cfg = TrainConfig(lr=0.05, momentum=0.9, weight_decay=5e-4, dropout=0.0, threads=1, timeout_s=60)
    return cfg.replace(**changes)


def global_batches(steps: int, k: int, b: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(k * b, 3, 16, 16, generator=g), torch.randint(0, CLASSES, (k * b,), generator=g))
            for _ in range(steps)]


def run_strategies(rt, cfg, runs: list[dict], steps: int, b: int) -> dict:
    """For each run (TrainConfig changes), train the tiny model for ``steps`` steps on
    this worker's rows ``[rank*B, (rank+1)*B)`` of each global batch (all rows for
    model parallelism, whose workers see the same examples); return per run the
    dense weights, losses and bytes per step."""
    results = {}
    for i, changes in enumerate(runs):
        run_cfg = cfg.replace(**{k: v for k, v in changes.items() if k != "hidden"})
        strategy = parallelize(tiny_model(changes.get("hidden", HIDDEN)), run_cfg, rt)
        own = slice(strategy.data_rank * b, (strategy.data_rank + 1) * b) if strategy.data_world > 1 else slice(None)
        losses, bytes_, calls = [], [], []
        strategy.comm.take()
        for x, y in global_batches(steps, rt.world, b):
            out = strategy.train_step(x[own].to(rt.device), y[own].to(rt.device))
            losses.append(out.loss)
            sent = strategy.comm.take()
            bytes_.append(sent["bytes"])
            calls.append(sent["calls"])
        state = {k: v.cpu() for k, v in strategy.full_state_dict().items()}
        results[i] = {"state": state, "losses": losses, "bytes": bytes_, "calls": calls}
    return results


def reference_sgd(cfg: TrainConfig, steps: int, k: int, b: int, hidden=HIDDEN) -> tuple[dict, list[float]]:
    """One process, batch K*B: plain PyTorch, what synchronous SGD must equal."""
    model = tiny_model(hidden)
    opt = model_sgd(model, cfg, cfg.lr)
    losses = []
    for x, y in global_batches(steps, k, b):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model.state_dict(), losses


def round_rows(scheme: str, k: int, b: int) -> list[torch.Tensor]:
    """Rows of the global batch that form round j: worker j's rows (b), or the j-th
    B/K chunk of every worker's rows (c)."""
    if scheme == "b":
        return [torch.arange(j * b, (j + 1) * b) for j in range(k)]
    c = b // k
    return [torch.cat([torch.arange(r * b + j * c, r * b + (j + 1) * c) for r in range(k)]) for j in range(k)]


def reference_rounds(cfg: TrainConfig, scheme: str, steps: int, k: int, b: int, cut: int = 0) -> dict:
    """The hybrid with --fc-batch worker, written sequentially (issue #5): conv forward
    (and the first ``cut`` FC layers) on all K*B examples; per round FC forward/backward
    of the rest on its B examples, keep the activation gradient, FC update; then backward
    of the data-parallel side with the collected gradients (each round's counting 1/K:
    the mean over K*B) and one update of it."""
    from onetrick.recipe import make_sgd, param_groups

    model = tiny_model()
    at = [i for i, layer in enumerate(model.head) if isinstance(layer, nn.Linear)][cut]
    data_side = [("trunk." + n, p) for n, p in model.trunk.named_parameters()]
    data_side += [("head." + n, p) for n, p in model.head[:at].named_parameters()]
    trunk_opt = make_sgd(param_groups(data_side, cfg, cfg.lr), cfg)
    head_opt = make_sgd(param_groups([("head." + n, p) for n, p in model.head[at:].named_parameters()], cfg, cfg.lr), cfg)
    for x, y in global_batches(steps, k, b):
        feats = model.head[:at](model.features(x))
        detached = feats.detach()
        grad = torch.zeros_like(detached)
        for rows in round_rows(scheme, k, b):
            a = detached[rows].clone().requires_grad_()
            F.cross_entropy(model.head[at:](a), y[rows]).backward()
            grad[rows] = a.grad / k
            head_opt.step()
            head_opt.zero_grad()
        feats.backward(grad)
        trunk_opt.step()
        trunk_opt.zero_grad()
    return model.state_dict()


def sharded_loss_and_grads(rt, cfg, classes: int, n: int) -> dict:
    """Cross-entropy on class-sharded logits: loss and this worker's logit gradients."""
    from onetrick.distributed.comm import Comm
    from onetrick.distributed.tensor_parallel import shard_range, sharded_cross_entropy

    comm = Comm()
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(n, classes, generator=g) * 4
    targets = torch.randint(0, classes, (n,), generator=g)
    start, end = shard_range(classes, comm.size, comm.rank)
    local = logits[:, start:end].clone().requires_grad_()
    loss = sharded_cross_entropy(local, targets, start, comm)
    loss.backward()
    sent = comm.take()
    return {"loss": loss.detach(), "grad": local.grad, "range": (start, end), "bytes": sent["bytes"],
            "calls": sent["calls"]}


def sharded_top_classes_of(rt, cfg, classes: int, n: int, views: int) -> dict:
    """The k=5 best classes from class-sharded logits, and the bytes that took."""
    from onetrick.distributed.comm import Comm
    from onetrick.distributed.tensor_parallel import shard_range, sharded_top_classes

    comm = Comm()
    logits = torch.randn(n * views, classes, generator=torch.Generator().manual_seed(4)) * 4
    start, end = shard_range(classes, comm.size, comm.rank)
    top = sharded_top_classes(logits[:, start:end].clone(), 5, views, start, classes, comm)
    return {"top": top, "bytes": comm.take()["bytes"]}


def evaluation_of(rt, cfg, classes: int, views: int) -> dict:
    """``onetrick.run.evaluate`` of the tiny model (class-sharded classifier) on synthetic data."""
    from onetrick.data import build_data
    from onetrick.run.evaluate import evaluate

    data = build_data(f"synthetic:{classes}", image_size=16)
    strategy = parallelize(tiny_model(NARROW, classes), cfg, rt)
    return evaluate(strategy, data, cfg.replace(eval_views=views, batch=64))


def head_devices(rt, cfg) -> dict:
    """Where the parameters of the dense model's head layers, and of the shard, live once
    the model is parallelised."""
    model = tiny_model(NARROW, 12)
    dense_head = model.head   # model parallelism replaces it in the model by the shard
    strategy = parallelize(model, cfg, rt)
    linears = [m for m in dense_head if isinstance(m, nn.Linear)]
    return {"dense": [m.weight.device.type for m in linears],
            "shard": sorted({p.device.type for p in strategy.head.parameters()})}


def two_tower_steps(rt, cfg, steps: int, b: int) -> dict:
    """alexnet2012 (10 classes, no dropout) under the configured strategy, same batches everywhere."""
    from onetrick.models import build_model

    torch.manual_seed(0)
    strategy = parallelize(build_model("alexnet2012", num_classes=10, dropout=0.0), cfg, rt)
    strategy.comm.take()
    sent = []
    for x, y in two_tower_batches(steps, b):
        strategy.train_step(x, y)
        sent.append(strategy.comm.take()["bytes"])
    return {"state": strategy.full_state_dict(), "bytes": sent,
            "tower_parallel": getattr(strategy, "tower_parallel", False)}


def two_tower_batches(steps: int, b: int):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(b, 3, 224, 224, generator=g), torch.randint(0, 10, (b,), generator=g)) for _ in range(steps)]


def one_step_bytes(rt, cfg, model_name: str, b: int, image: int) -> dict:
    """Bytes one worker sends in one training step of a real model (synthetic images)."""
    from onetrick.models import build_model

    torch.manual_seed(0)
    strategy = parallelize(build_model(model_name, num_classes=1000, dropout=0.0), cfg, rt)
    g = torch.Generator().manual_seed(rt.rank)
    strategy.comm.take()
    strategy.train_step(torch.randn(b, 3, image, image, generator=g), torch.randint(0, 1000, (b,), generator=g))
    return strategy.comm.take()["bytes"]


def hang_or_die(rt, cfg, mode: str) -> None:
    """Worker 1 hangs (or dies); worker 0 waits for it in a collective."""
    import os
    import time

    import torch.distributed as dist

    if rt.rank == 1:
        if mode == "die":
            os._exit(3)
        time.sleep(600)
    dist.all_reduce(torch.ones(1))


def image_batches(steps: int, k: int, b: int, image: int, seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(k * b, 3, image, image, generator=g), torch.randint(0, CLASSES, (k * b,), generator=g))
            for _ in range(steps)]


def sampled(state: dict, stride: int) -> dict:
    """Every ``stride``-th element of each tensor: enough to compare, small to ship back."""
    return {name: t.detach().flatten()[::stride].clone() for name, t in state.items()}


def torchvision_steps(rt, cfg, name: str, runs: list[dict], steps: int, b: int, image: int, stride: int) -> dict:
    """torchvision's NAME (CLASSES classes, no dropout) under each run's strategy; this
    worker reads rows [rank*B, (rank+1)*B) of each global batch. Returns sampled weights."""
    from onetrick.models import build_model

    results = {}
    for i, changes in enumerate(runs):
        torch.manual_seed(0)
        strategy = parallelize(build_model(f"torchvision:{name}", num_classes=CLASSES, dropout=0.0),
                               cfg.replace(**changes), rt)
        own = slice(strategy.data_rank * b, (strategy.data_rank + 1) * b) if strategy.data_world > 1 else slice(None)
        for x, y in image_batches(steps, rt.world, b, image):
            strategy.train_step(x[own], y[own])
        strategy.set_training(False)  # as before evaluation: BatchNorm's running statistics become worker 0's
        results[i] = sampled(strategy.full_state_dict(), stride)
        del strategy
    return results


def torchvision_reference(cfg: TrainConfig, name: str, steps: int, k: int, b: int, image: int, stride: int,
                          per_worker_bn: bool = False) -> dict:
    """One process, batch K*B, plain PyTorch on torchvision's NAME.

    ``per_worker_bn``: what data parallelism computes for a trunk with BatchNorm. The
    trunk runs on each worker's B rows separately (each normalised by its own batch's
    statistics), the head on all K*B rows, one loss over all of them; the running
    statistics follow worker 0's rows alone (momentum 0 for the others leaves them as they
    were), as the strategies keep worker 0's."""
    from onetrick.models import build_model

    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}", num_classes=CLASSES, dropout=0.0)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    opt = model_sgd(model, cfg, cfg.lr)
    for x, y in image_batches(steps, k, b, image):
        opt.zero_grad()
        if per_worker_bn:
            feats = []
            for r in range(k):
                for m in norms:
                    m.momentum = 0.1 if r == 0 else 0.0
                feats.append(model.features(x[r * b:(r + 1) * b]))
                if r:  # worker 0's count, too
                    for m in norms:
                        m.num_batches_tracked -= 1
            logits = model.head(torch.cat(feats))
        else:
            logits = model(x)
        F.cross_entropy(logits, y).backward()
        opt.step()
    return sampled(model.state_dict(), stride)


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


class HostReads:
    """Counts the Tensor methods that read a value to the host (each one a host-device
    sync on an accelerator) while active: the CPU-testable stand-in for CUDA's sync
    debug mode."""

    def __enter__(self) -> "HostReads":
        self.count, self._saved = 0, {name: getattr(torch.Tensor, name) for name in HOST_READS}
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, self._counting(original))
        return self

    def _counting(self, original):
        def read(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)
        return read

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def step_host_reads(rt, cfg, runs: list[dict], b: int) -> dict:
    """Per run: host reads during 3 training steps plus their device accumulation, and
    during one read of the accumulated figures; with ``--on-nan skip``, whether a step
    with NaN images on worker 0 left the same weights as never taking that step.
    (``--fc-batch worker`` skips per round: rounds without a NaN still update the head.)"""
    from onetrick.distributed.strategy import StepStats

    results = {}
    batches = global_batches(3, rt.world, b)
    bad = (batches[1][0].clone(), batches[1][1])
    bad[0][:b] = float("nan")  # all of worker 0's rows: in scheme (c) every round gets some
    for i, changes in enumerate(runs):
        strategy = parallelize(tiny_model(), cfg.replace(on_nan="skip", **changes), rt)
        own = slice(strategy.data_rank * b, (strategy.data_rank + 1) * b) if strategy.data_world > 1 else slice(None)
        stats = StepStats(rt.device)
        with HostReads() as during_steps:
            for step, (x, y) in enumerate([batches[0], bad, batches[2]]):
                stats.add(strategy.train_step(x[own], y[own]), step)
        with HostReads() as during_read:
            seen = stats.read()
        skipped = strategy.full_state_dict()
        clean = parallelize(tiny_model(), cfg.replace(on_nan="skip", **changes), rt)
        for x, y in [batches[0], batches[2]]:
            clean.train_step(x[own], y[own])
        results[i] = {"step_reads": during_steps.count, "read_reads": during_read.count, "seen": seen,
                      "skipped": skipped, "clean": clean.full_state_dict()}
    return results


def warmup_rates(rt, cfg, steps_per_epoch: int, at: list[int]) -> dict:
    """The rate of every parameter group of every optimizer of ``cfg``'s strategy on the
    tiny model, at each step of ``at`` (0-based), as the training loop sets it."""
    from onetrick.recipe import schedule_factor, set_lr, warmup_progress

    strategy = parallelize(tiny_model(), cfg, rt)
    total = 4 * steps_per_epoch
    rates = {}
    for step in at:
        set_lr(strategy.optimizers(), schedule_factor(cfg, step, total), warmup_progress(cfg, step, steps_per_epoch))
        rates[step] = [[(g["name"], g["lr"]) for g in opt.param_groups] for opt in strategy.optimizers()]
    return rates


# -- the configurations the equivalence tests run, and their comparison ----------------------
# HIDDEN: the classifier split by inputs (row-wise); NARROW: split by classes (sharded loss)
EXACT_SGD = [dict(strategy="model"), dict(strategy="data", sync="ddp"), dict(strategy="data", sync="sharded"),
             dict(strategy="hybrid", scheme="a"), dict(strategy="hybrid", scheme="b"),
             dict(strategy="hybrid", scheme="c"), dict(strategy="model", hidden=NARROW),
             dict(strategy="hybrid", scheme="b", hidden=NARROW), dict(strategy="hybrid", scheme="c", hidden=NARROW)]
PER_ROUND = [dict(strategy="hybrid", scheme="b", fc_batch="worker"),
             dict(strategy="hybrid", scheme="c", fc_batch="worker")]
# --cut: 1 leaves fc7 and a row-wise classifier model-parallel; 2 (the last) the classifier
# alone, split by classes
CUT_SGD = [dict(strategy="hybrid", scheme=s, cut=c) for c in (1, 2) for s in ("a", "b", "c")]
CUT_ROUNDS = [dict(strategy="hybrid", scheme=s, fc_batch="worker", cut=c) for c in (1, 2) for s in ("b", "c")]
# K=4: fc7's 30 neurons split 8/8/8/6, the 5 classes 2/2/1/0 (worker 3 holds none)
CUT_K4 = [dict(strategy="hybrid", scheme="c", cut=1), dict(strategy="hybrid", scheme="b", cut=2),
          dict(strategy="hybrid", scheme="b", fc_batch="worker", cut=1)]


def assert_same_weights(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=2e-5, msg=lambda m: f"{what}: {name}: {m}")
