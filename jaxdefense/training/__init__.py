"""Training: ``TrainState``, jit-compiled steps, the loop, checkpoints, metrics, sharding.

>>> config = jaxdefense.configs.get("demo")
>>> state = jaxdefense.training.train_and_evaluate(config, "/tmp/run")  # resumes if possible
>>> state, config = jaxdefense.training.restore("/tmp/run")

A run writes ``checkpoints/`` (periodic, orbax), ``best/`` (best on validation),
``metrics.jsonl`` and ``config.json`` in its workdir.  Steps are compiled once
(``CompiledStep.traces``), the batch is sharded over every device of a 1-D mesh, and a
run killed at any moment resumes to the same final parameters.

Objectives follow one contract: ``objective(apply_fn, x, y, key) -> (loss, aux)``
where ``apply_fn(x) -> (logits, model_state)`` runs the model in training mode and
``aux`` holds at least ``"logits"`` and ``"model_state"`` (see `make_train_step`).
"""

from __future__ import annotations

from jaxdefense.training._build import build_model as build_model
from jaxdefense.training._build import build_objective as build_objective
from jaxdefense.training._build import build_optimizer as build_optimizer
from jaxdefense.training._build import build_schedule as build_schedule
from jaxdefense.training._build import build_step as build_step
from jaxdefense.training._checkpoint import CheckpointError as CheckpointError
from jaxdefense.training._checkpoint import Checkpoints as Checkpoints
from jaxdefense.training._loop import CONFIG_FILE as CONFIG_FILE
from jaxdefense.training._loop import METRICS_FILE as METRICS_FILE
from jaxdefense.training._loop import Experiment as Experiment
from jaxdefense.training._loop import NonFiniteLossError as NonFiniteLossError
from jaxdefense.training._loop import build_experiment as build_experiment
from jaxdefense.training._loop import evaluate_checkpoint as evaluate_checkpoint
from jaxdefense.training._loop import restore as restore
from jaxdefense.training._loop import train_and_evaluate as train_and_evaluate
from jaxdefense.training._metrics import MetricsWriter as MetricsWriter
from jaxdefense.training._metrics import format_table as format_table
from jaxdefense.training._metrics import read_metrics as read_metrics
from jaxdefense.training._sharding import batch_sharding as batch_sharding
from jaxdefense.training._sharding import make_mesh as make_mesh
from jaxdefense.training._sharding import replicated as replicated
from jaxdefense.training._sharding import shard_batch as shard_batch
from jaxdefense.training._state import TrainState as TrainState
from jaxdefense.training._state import create_train_state as create_train_state
from jaxdefense.training._steps import CompiledStep as CompiledStep
from jaxdefense.training._steps import evaluate as evaluate
from jaxdefense.training._steps import make_eval_step as make_eval_step
from jaxdefense.training._steps import make_train_step as make_train_step

__all__ = [
    "CONFIG_FILE", "CheckpointError", "Checkpoints", "CompiledStep", "Experiment",
    "METRICS_FILE", "MetricsWriter", "NonFiniteLossError", "TrainState", "batch_sharding",
    "build_experiment", "build_model", "build_objective", "build_optimizer",
    "build_schedule", "build_step", "create_train_state", "evaluate",
    "evaluate_checkpoint", "format_table", "make_eval_step", "make_mesh",
    "make_train_step", "read_metrics", "replicated", "restore",
    "shard_batch", "train_and_evaluate",
]
