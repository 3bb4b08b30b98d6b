"""Parallelism: the runtime (launch, process groups, mesh, byte accounting) and one
module per strategy. Strategies wrap a plain model; the model knows nothing of them."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onetrick.config import TrainConfig
    from onetrick.distributed.runtime import Runtime
    from onetrick.distributed.strategy import Strategy
    from onetrick.models import TrunkHeadNet


def parallelize(model: TrunkHeadNet, cfg: TrainConfig, rt: Runtime) -> Strategy:
    """Apply the configured synchronous parallelism to a plain model (torchtitan's
    "parallelize" step). Asynchronous strategies run their own loops."""
    if cfg.strategy == "single":
        from onetrick.distributed.strategy import SingleStrategy

        return SingleStrategy(model, cfg, rt)
    if cfg.strategy == "data":
        from onetrick.distributed.data_parallel import data_parallel

        return data_parallel(model, cfg, rt)
    if cfg.strategy == "model":
        from onetrick.distributed.model_parallel import ModelParallel

        return ModelParallel(model, cfg, rt)
    if cfg.strategy == "hybrid":
        from onetrick.distributed.hybrid import Hybrid

        return Hybrid(model, cfg, rt)
    raise ValueError(f"strategy {cfg.strategy!r} has no synchronous worker")
