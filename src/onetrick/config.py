"""Training configuration: one dataclass, validated before any worker starts.

The architecture lives in ``models``; everything tunable lives here, as cuda-convnet2
kept its layer definitions apart from its layer parameters.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

STRATEGIES = ("single", "data", "model", "hybrid", "hogwild", "paramserver", "auto")
DATA_PARALLEL_SYNCS = ("ddp", "sharded")
SCHEMES = ("a", "b", "c", "auto")
FC_BATCHES = ("full", "worker")
LR_SCALES = ("none", "linear", "sqrt")
SCHEDULES = ("step", "const", "linear", "exp")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


class ConfigError(ValueError):
    """An invalid option or combination; the message is one line naming the problem."""


@dataclass
class TrainConfig:
    # what to train
    model: str = "smallnet"
    data: str = "digits"
    image_size: int | None = None          # None: the model's native input size
    classes: int | None = None              # classifier width; None: the data's classes (synthetic: any N)
    dropout: float = 0.5
    # how long
    batch: int = 32                         # per worker (the paper's B)
    steps: int | None = None
    epochs: float = 10.0
    # the recipe (docs/PAPER.md): SGD, momentum 0.9, wd 5e-4 on weights, biases at 2x lr
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bias_lr_mult: float = 2.0
    lr_mult: list[str] = field(default_factory=list)   # "GLOB=MULT" on parameter names
    schedule: str = "step"
    lr_drops: tuple[float, ...] = (0.5, 0.75)           # fractions of training
    lr_drop_factor: float = 0.1
    lr_scale: str = "none"                  # for a K-times larger batch: none | linear | sqrt
    warmup_epochs: float = 0.0              # rise from the one-worker rate to the scaled one (recipe.warmup_progress)
    seed: int = 0
    # parallelism
    workers: int = 1
    strategy: str = "single"
    sync: str = "ddp"
    scheme: str | None = None
    fc_batch: str = "full"
    cut: int = 0                            # hybrid: head Linear layers run data-parallel with the trunk
    plan: dict | None = None                # --strategy/--scheme auto: the planner's choice and predictions
    servers: int = 1
    fetch_every: int = 1
    push_every: int = 1
    device: str = "cpu"
    precision: str = "fp32"                 # bf16: autocast compute; weights, optimizer state and losses fp32
    comm_dtype: str = "fp32"                # bf16: gradients and activations cross the network in bf16
    threads: int | None = None              # CPU threads per worker; None: cores / workers
    memory_per_worker: float | None = None  # GB each worker may use; None: detected (preflight.check_memory)
    timeout_s: float = 300.0                # every collective fails after this instead of hanging
    max_restarts: int = 0
    # bookkeeping
    out: Path | None = None                 # None: a fresh runs/<date-time>, linked as runs/latest (run/rundir.py)
    resume: bool = False
    overwrite: bool = False                 # remove onetrick's files of the run already in `out`
    eval_every: int = 200
    eval_views: int = 1
    log_every: int = 10
    ckpt_every: int = 200
    on_nan: str = "stop"                    # stop | skip
    skip_corrupt: bool = False
    train_examples: int | None = None       # a fixed class-stratified subset of the training set
    download: bool = False                  # torchvision's download of fashion-mnist:DIR / cifar10:DIR
    progress: bool = True
    tensorboard: bool = False               # also write RUN/tensorboard/ (torch.utils.tensorboard)
    debug: bool = False                     # full tracebacks on the console instead of RUN/error.log

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> TrainConfig:
        """Raise ConfigError on the first invalid option; return self for chaining.

        Options only, each on its own and in combination: nothing is built or read here.
        How they meet the model and the data (``--model``, ``--data``, ``--image-size``,
        ``--cut``'s range, ``--lr-mult``'s names, the batch against the training set) is
        checked once per launch, before any worker starts, by ``onetrick.run.preflight``."""
        if self.classes is not None:
            _check(self.classes >= 2, f"--classes must be at least 2 (got {self.classes})")
            kind, _, count = str(self.data).partition(":")
            _check(not (kind == "synthetic" and count and count.isdigit() and int(count) != self.classes),
                   f"--classes {self.classes} contradicts --data {self.data}; give one of them")
        _check(self.batch >= 1, f"--batch must be at least 1 (got {self.batch})")
        _check(self.steps is None or self.steps >= 1, f"--steps must be at least 1 (got {self.steps})")
        _check(self.epochs > 0, f"--epochs must be positive (got {self.epochs})")
        _check(self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number (got {self.lr})")
        _check(math.isfinite(self.epochs), f"--epochs must be finite (got {self.epochs})")
        self._validate_recipe()
        _check(0 <= self.seed < 2**32, f"--seed must be in [0, 2**32) (got {self.seed})")
        _check(self.threads is None or self.threads >= 1, f"--threads must be at least 1 (got {self.threads})")
        _check(self.memory_per_worker is None or 0 < self.memory_per_worker < math.inf,
               f"--memory-per-worker must be a positive number of GB (got {self.memory_per_worker})")
        for name in ("eval_every", "log_every", "ckpt_every"):
            value = getattr(self, name)
            _check(value >= 1, f"--{name.replace('_', '-')} must be at least 1 (got {value})")
        _check(0 < self.timeout_s < math.inf, f"--timeout must be a positive number of seconds (got {self.timeout_s})")
        if self.tensorboard:
            _check(importlib.util.find_spec("tensorboard") is not None,
                   "--tensorboard needs the tensorboard package: pip install 'onetrick[tensorboard]'")
        _check(self.max_restarts >= 0, f"--max-restarts must be at least 0 (got {self.max_restarts})")
        _check(self.servers >= 1, f"--servers must be at least 1 (got {self.servers})")
        _check(self.fetch_every >= 1, f"--fetch-every must be at least 1 (got {self.fetch_every})")
        _check(self.push_every >= 1, f"--push-every must be at least 1 (got {self.push_every})")
        if self.image_size is not None:
            _check(8 <= self.image_size <= 4096, f"--image-size must be in [8, 4096] (got {self.image_size})")
        _check(self.on_nan in ("stop", "skip"), f"unknown --on-nan {self.on_nan!r}; choose stop or skip")
        _check(self.eval_views in (1, 10), f"--eval-views must be 1 or 10 (got {self.eval_views})")
        _check(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1) (got {self.dropout})")
        self.validate_parallelism()
        _check(not (self.resume and self.overwrite), "--resume continues the run in --out, --overwrite removes it: give one")
        if self.resume and self.out is not None:
            _check(Path(self.out).exists(), f"--resume given but run directory {self.out} does not exist")
        return self

    def _validate_recipe(self) -> None:
        """The learning rule: momentum, weight decay, multipliers, schedule, warm-up."""
        _check(0.0 <= self.momentum < 1.0, f"--momentum must be in [0, 1) (got {self.momentum})")
        _check(0.0 <= self.weight_decay < 1.0, f"--weight-decay must be in [0, 1) (got {self.weight_decay})")
        _check(0.0 <= self.bias_lr_mult <= 1e3, f"--bias-lr-mult must be in [0, 1000] (got {self.bias_lr_mult})")
        for item in self.lr_mult:
            glob, _, value = item.partition("=")
            _check(bool(glob) and _is_float(value), f"--lr-mult expects GLOB=NUMBER (got {item!r})")
            _check(0.0 <= float(value) < math.inf, f"--lr-mult needs a multiplier >= 0 (got {item!r})")
        _check(self.schedule in SCHEDULES, f"unknown --schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        _check(all(0.0 < d < 1.0 for d in self.lr_drops), f"--lr-drops must be fractions of training in (0, 1) (got {_csv(self.lr_drops)})")
        _check(list(self.lr_drops) == sorted(self.lr_drops), f"--lr-drops must be increasing (got {_csv(self.lr_drops)})")
        _check(0.0 < self.lr_drop_factor <= 1.0, f"--lr-drop-factor must be in (0, 1] (got {self.lr_drop_factor})")
        _check(self.lr_scale in LR_SCALES, f"unknown --lr-scale {self.lr_scale!r}; choose none, linear or sqrt")
        _check(0.0 <= self.warmup_epochs < math.inf, f"--warmup-epochs must be a number of epochs >= 0 (got {self.warmup_epochs})")
        _check(self.steps is not None or self.warmup_epochs <= self.epochs,
               f"--warmup-epochs {self.warmup_epochs:g} is longer than the run (--epochs {self.epochs:g})")
        _check(self.warmup_epochs == 0 or self.lr_scale != "none",
               "--warmup-epochs needs --lr-scale linear or sqrt: it warms from the one-worker rate to the scaled one, "
               "and with --lr-scale none they are the same")

    def validate_parallelism(self) -> TrainConfig:
        """How the work is split (workers, strategy, sync, scheme, cut, fc batch, device,
        precision); part of :meth:`validate`, and all that the planner's choice for
        ``--strategy``/``--scheme auto`` (``run/auto.py``) changes, so checked alone there."""
        _check(self.workers >= 1, f"--workers must be at least 1 (got {self.workers})")
        _check(self.strategy in STRATEGIES, f"unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        _check(self.sync in DATA_PARALLEL_SYNCS, f"unknown --sync {self.sync!r}; choose ddp or sharded")
        _check(self.device in DEVICES, f"unknown --device {self.device!r}; choose cpu or cuda")
        self._validate_precision()
        _check(self.fc_batch in FC_BATCHES, f"unknown --fc-batch {self.fc_batch!r}; choose full or worker")
        if self.scheme is not None:
            _check(self.strategy == "hybrid", f"--scheme {self.scheme} needs --strategy hybrid (got --strategy {self.strategy})")
            _check(self.scheme in SCHEMES, f"unknown --scheme {self.scheme!r}; choose a, b, c or auto")
        if self.cut != 0:   # its range needs the model's head: run.preflight.check_cut
            _check(self.cut > 0, f"--cut must be at least 0 (got {self.cut})")
            _check(self.strategy in ("hybrid", "auto"), f"--cut {self.cut} needs --strategy hybrid (got --strategy {self.strategy})")
        if self.fc_batch == "worker":
            _check(self.strategy in ("hybrid", "auto"), "--fc-batch worker needs --strategy hybrid (or auto)")
            _check(self.scheme != "a", "--fc-batch worker needs --scheme b or c: scheme a runs the FC layers once on all K*B examples")
        if self.strategy == "single":
            _check(self.workers == 1, f"--strategy single runs one worker (got --workers {self.workers}); pick data, model, hybrid, hogwild or paramserver")
        if self.strategy == "hybrid" and self.scheme == "c":
            _check(self.batch % self.workers == 0, f"--scheme c needs --batch divisible by --workers (got {self.batch} and {self.workers})")
        if self.device == "cuda":
            import torch

            _check(torch.cuda.is_available(), "--device cuda given but no CUDA device is available")
            if self.strategy not in ("single", "hogwild"):
                _check(self.workers <= torch.cuda.device_count() or "LOCAL_RANK" in os.environ,
                       f"--workers {self.workers} exceeds the {torch.cuda.device_count()} GPUs on this machine")
        return self

    def _validate_precision(self) -> None:
        _check(self.precision in PRECISIONS, f"unknown --precision {self.precision!r}; choose fp32 or bf16")
        _check(self.comm_dtype in PRECISIONS, f"unknown --comm-dtype {self.comm_dtype!r}; choose fp32 or bf16")
        if self.precision == self.comm_dtype == "fp32":
            return
        _check(self.strategy not in ("hogwild", "paramserver"),
               f"--precision/--comm-dtype bf16 apply to single, data, model and hybrid (got --strategy {self.strategy})")
        if self.precision == "bf16":
            import torch

            if self.device == "cuda":
                _check(not torch.cuda.is_available() or torch.cuda.is_bf16_supported(),
                       "--precision bf16: this GPU does not support bfloat16")
            else:
                _check(torch.amp.is_autocast_available("cpu"), "--precision bf16: this torch has no CPU autocast")

    @property
    def data_parallel_degree(self) -> int:
        """How many workers read different examples (the K in the global batch K*B)."""
        return 1 if self.strategy in ("single", "model") else self.workers

    @property
    def process_count(self) -> int:
        """Processes the launcher starts: workers, plus parameter servers."""
        return self.workers + (self.servers if self.strategy == "paramserver" else 0)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _csv(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
