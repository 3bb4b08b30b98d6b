"""Test error: top-1 and top-5 over the whole test set, each example counted once."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset

from onetrick.config import TrainConfig
from onetrick.data import DataBundle


def shard_indices(n: int, rank: int, world: int) -> tuple[list[int], torch.Tensor]:
    """Every ``world``-th example from ``rank``, padded (with example 0, masked out) so
    that all workers run the same number of batches: collectives stay matched and no
    padding example is ever counted."""
    own = list(range(rank, n, world))
    per_worker = -(-n // world)
    valid = torch.zeros(per_worker, dtype=torch.bool)
    valid[:len(own)] = True
    return own + [0] * (per_worker - len(own)), valid


@torch.no_grad()
def evaluate(strategy, data: DataBundle, cfg: TrainConfig) -> dict[str, float]:
    """Top-1/top-5 error with ``cfg.eval_views`` views per image (softmax averaged)."""
    strategy.set_training(False)
    dataset = data.test(views=cfg.eval_views)
    indices, valid = shard_indices(len(dataset), strategy.data_rank, strategy.data_world)
    loader = DataLoader(Subset(dataset, indices), batch_size=max(cfg.batch, 64), num_workers=data.loader_workers)
    device = strategy.rt.device
    counts = torch.zeros(3, dtype=torch.float64)
    seen = 0
    for images, targets in loader:
        mask = valid[seen:seen + len(targets)]
        seen += len(targets)
        images, targets = images.to(device), targets.to(device)
        views = images.shape[1] if images.ndim == 5 else 1   # (N, views, C, H, W): softmax averaged over views
        top5 = strategy.top_classes(images.flatten(0, 1) if views > 1 else images, 5, views).cpu()
        hit = top5 == targets.cpu()[:, None]
        counts += torch.stack([(~hit[:, 0] & mask).sum(), (~hit.any(1) & mask).sum(), mask.sum()]).double()
    if strategy.data_world > 1:
        counts = counts.to(device)
        strategy.comm.all_reduce(counts, tag="metrics")
        counts = counts.cpu()
    strategy.comm.take()  # evaluation traffic is not a training step's
    return {"top1_error": float(counts[0] / counts[2]), "top5_error": float(counts[1] / counts[2]),
            "test_examples": int(counts[2])}
