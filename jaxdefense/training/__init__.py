"""Training: ``TrainState``, jit-compiled steps, the run, checkpoints, metrics.

>>> config = jaxdefense.configs.get("demo")
>>> state = jaxdefense.training.train_and_evaluate(config, "/tmp/run")  # resumes if possible
>>> state, config = jaxdefense.training.restore("/tmp/run")

A run writes ``checkpoints/`` (periodic, orbax, each with the SHA-256 checksums of its
arrays, verified on every restore), ``best/`` (best on validation), ``metrics.jsonl`` and
``config.json`` in its workdir, and holds ``run.lock`` (an OS file lock: one training run
per workdir) while it trains.  Steps are compiled once
(``_steps.CompiledStep.traces``), the batch is sharded over every device of a 1-D mesh
(``jaxdefense.data.make_mesh``, ``shard_batch``), and a
run killed at any moment resumes to the same final parameters.  The config is validated
once, by the entry points (``train_and_evaluate``, ``restore``, ``build_experiment``).

Modules: ``_experiment`` (what a validated config builds: data, mesh, model, objective,
optimizer, schedule, initial state), ``_run`` (the training loop), ``_restore`` (reading
a run back), ``_warm`` (a run that starts from another run's weights,
``init.from_workdir``), ``_steps`` (compiled steps), ``_build`` (builders),
``_checkpoint``, ``_metrics``, ``_state``.

Objectives follow one contract: ``objective(model, x, y, key) -> (loss, aux)`` where
``model`` is a training-mode ``jaxdefense.models.ModelFn`` (``model.apply(x) -> (logits,
model_state)``) and ``aux`` holds at least ``"logits"`` and ``"model_state"`` (see
`make_train_step`).
"""

from __future__ import annotations

from jaxdefense.training._build import build_model as build_model
from jaxdefense.training._build import build_objective as build_objective
from jaxdefense.training._build import build_optimizer as build_optimizer
from jaxdefense.training._build import build_schedule as build_schedule
from jaxdefense.training._build import build_step as build_step
from jaxdefense.training._checkpoint import CheckpointError as CheckpointError
from jaxdefense.training._checkpoint import Checkpoints as Checkpoints
from jaxdefense.training._checkpoint import LOCK_FILE as LOCK_FILE
from jaxdefense.training._checkpoint import WorkdirLock as WorkdirLock
from jaxdefense.training._checkpoint import WorkdirLockedError as WorkdirLockedError
from jaxdefense.training._distributed import DistributedError as DistributedError
from jaxdefense.training._distributed import initialize_distributed as initialize_distributed
from jaxdefense.training._experiment import Experiment as Experiment
from jaxdefense.training._experiment import build_experiment as build_experiment
from jaxdefense.training._restore import evaluate_checkpoint as evaluate_checkpoint
from jaxdefense.training._restore import restore as restore
from jaxdefense.training._run import CONFIG_FILE as CONFIG_FILE
from jaxdefense.training._run import METRICS_FILE as METRICS_FILE
from jaxdefense.training._run import NonFiniteLossError as NonFiniteLossError
from jaxdefense.training._run import train_and_evaluate as train_and_evaluate
from jaxdefense.training._metrics import MetricsWriter as MetricsWriter
from jaxdefense.training._metrics import read_metrics as read_metrics
from jaxdefense.training._metrics import train_seconds as train_seconds
from jaxdefense.training._state import TrainState as TrainState
from jaxdefense.training._state import create_train_state as create_train_state
from jaxdefense.training._steps import bound_model as bound_model
from jaxdefense.training._steps import evaluate as evaluate
from jaxdefense.training._steps import make_eval_step as make_eval_step
from jaxdefense.training._steps import make_train_step as make_train_step
from jaxdefense.training._warm import WarmStart as WarmStart
from jaxdefense.training._warm import warm_start as warm_start

__all__ = [
    "CONFIG_FILE", "CheckpointError", "Checkpoints", "DistributedError", "Experiment", "LOCK_FILE", "METRICS_FILE",
    "MetricsWriter", "NonFiniteLossError", "TrainState", "WarmStart", "WorkdirLock",
    "WorkdirLockedError",
    "bound_model", "build_experiment",
    "build_model", "build_objective", "build_optimizer", "build_schedule", "build_step",
    "create_train_state", "evaluate", "evaluate_checkpoint", "initialize_distributed",
    "make_eval_step",
    "make_train_step", "read_metrics", "restore", "train_seconds", "train_and_evaluate",
    "warm_start",
]
