"""The training run: ``train_and_evaluate`` and its loop.

Per step the compiled train step; per ``log_every_steps`` one pull of the metrics to the
host (NaN check, ``metrics.jsonl``); per epoch validation, the best checkpoint and a
periodic checkpoint (or every ``checkpoint.every_steps`` steps); at the end a final
checkpoint, evaluation and table.  The config is validated once, in
:func:`train_and_evaluate`; everything below takes the validated config.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from jax.sharding import Mesh

from jaxdefense import configs as _configs
from jaxdefense import data as _data
from jaxdefense._table import format_table
from jaxdefense.data import _sharding
from jaxdefense.training import _build
from jaxdefense.training import _experiment
from jaxdefense.training import _warm
from jaxdefense.training._checkpoint import Checkpoints, WorkdirLock, check_workdir
from jaxdefense.training._experiment import Experiment
from jaxdefense.training._metrics import MetricsWriter
from jaxdefense.training._state import TrainState
from jaxdefense.training._steps import CompiledStep, evaluate, make_eval_step, make_train_step

__all__ = ["NonFiniteLossError", "train_and_evaluate", "METRICS_FILE", "CONFIG_FILE"]

METRICS_FILE = "metrics.jsonl"
"""Name of the run's metrics log in its workdir (JSON lines, see ``read_metrics``)."""
CONFIG_FILE = "config.json"
"""Name of the validated config a run writes into its workdir (JSON)."""


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite; training stopped without saving."""


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out.extend(_config_diff(a, b, f"{prefix}{k}."))
    elif json.dumps(a) != json.dumps(b):
      out.append(f"{prefix}{k}: {a!r} -> {b!r}")
  return out


class _Printer:
  """Prints (process 0 only), through tqdm when a bar is open."""

  def __init__(self, verbose: bool):
    self.verbose = verbose and jax.process_index() == 0

  def __call__(self, text: str) -> None:
    if self.verbose:
      tqdm.tqdm.write(text)


def _sum_metrics(pending: list[dict]) -> dict[str, float]:
  host = jax.device_get(pending)
  out: dict[str, float] = {}
  for m in host:
    for k, v in m.items():
      out[k] = out.get(k, 0.0) + float(np.asarray(v, np.float64))
  return out


def _averages(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
  count = sums.get("count", 0.0)
  if count <= 0:
    return {}
  out = {}
  for k, v in sums.items():
    if k == "count":
      continue
    name = "accuracy" if k == "correct" else k
    out[prefix + name] = v / count
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       mesh: Mesh | None = None, verbose: bool = True) -> TrainState:
  """Train a model as ``config`` says, evaluating and checkpointing in ``workdir``.

  Resumes when ``workdir`` holds a checkpoint: the state (parameters, batch
  statistics, optimizer state, step, root key) is restored and training continues at
  the same batch of the same epoch (the data order depends only on ``(seed, epoch)``),
  so a run killed at any moment and started again ends with the parameters of an
  uninterrupted run.  A finished run is not retrained (it is only evaluated again).

  Per step: one call of the compiled train step (augmentation on device, objective,
  gradient, optimizer).  Every ``log_every_steps`` steps the metrics are pulled from
  the device once, checked for NaN and appended to ``workdir/metrics.jsonl``.  At the
  end of each epoch: validation (every ``eval_every_epochs``; best checkpoint under
  ``workdir/best``), optional test, and a checkpoint in ``workdir/checkpoints``
  (or every ``checkpoint.every_steps`` steps).  At the end: a final checkpoint,
  validation and test evaluation, a final ``metrics.jsonl`` record and a table
  printed to stdout.

  The batch is split over all devices of ``mesh`` (a 1-D data-parallel mesh over every
  device by default, multi-host included); parameters are replicated.

  Args:
    config: a ``ConfigDict`` (see ``jaxdefense.configs.base_config`` for the schema;
      missing fields take their defaults); validated here, once, with
      ``jaxdefense.configs.validate``.
    workdir: folder for checkpoints, ``metrics.jsonl`` and ``config.json`` (created
      if missing).  The run holds an exclusive lock on it from start to end
      (``workdir/run.lock``, an OS file lock released when the process ends in any
      way), so a second run on the same workdir fails at once.
    mesh: device mesh (default ``make_mesh()`` over ``jax.devices()``).
    verbose: print resume notes and the final table (process 0 only).

  Returns:
    The final :class:`TrainState`.

  Raises:
    TypeError: ``workdir`` not a str or path.
    ValueError: unknown data set, model, config key or value; ``batch_size`` or
      ``eval_batch_size`` not divisible by the device count; a batch larger than the
      training set; ``workdir`` a file, under a file, or not creatable.
    WorkdirLockedError: (a ``ValueError``) another run holds ``workdir``; the message
      names its process id.
    CheckpointError: (a ``ValueError``) a checkpoint in ``workdir`` that is corrupt
      (checksum mismatch, unreadable files) or does not match the config.
    NonFiniteLossError: (a ``FloatingPointError``) the loss became NaN or infinite.
    jaxdefense.data.DatasetNotFoundError: data not available locally.
  """
  t_start = time.time()
  config = _configs.validate(config)  # the one validation of a training run
  workdir = check_workdir(workdir)
  log = _Printer(verbose)
  mesh = _experiment.training_mesh(config, mesh)
  is_main = jax.process_index() == 0
  # Process 0 creates and locks the workdir before anything else touches it (a second
  # run must fail before it loads data or cleans the first run's temporary folders).
  lock = _lock_workdir(workdir) if is_main else None
  try:
    state, summary = _train(config, workdir, mesh, log, is_main, t_start)
  finally:
    if lock is not None:
      lock.release()
  if verbose and is_main:
    print(summary, flush=True)
  return state


def _lock_workdir(workdir: pathlib.Path) -> WorkdirLock:
  """Create ``workdir`` (and its parents) and take its lock.

  Raises:
    ValueError: the folder or its lock file cannot be created (the message names the
      path and the reason).
    WorkdirLockedError: another run holds the lock.
  """
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    return WorkdirLock(workdir).acquire()
  except OSError as e:  # no permission, read-only file system, a file in the way...
    raise ValueError(f"workdir={str(workdir)!r} cannot be used as a run folder: "
                     f"{e.strerror} ({e.filename}).") from None


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh: Mesh,
           log: _Printer, is_main: bool, t_start: float) -> tuple[TrainState, str]:
  """The run of :func:`train_and_evaluate` in a created (and locked) ``workdir``:
  ``(final state, end-of-run table)``."""
  splits = _experiment.load_splits(config)
  exp = _experiment.experiment_for_data(config, splits["train"]).on_mesh(mesh)
  config_json = _experiment.config_json(config)
  ckpt = Checkpoints(workdir, max_to_keep=config.checkpoint.max_to_keep,
                     keep_best=config.checkpoint.keep_best and "validation" in splits,
                     best_metric=config.checkpoint.best_metric)
  try:
    state = _start_state(exp, ckpt, mesh, workdir, config_json, log)
    start = int(jax.device_get(state.step))
    if is_main:
      _write_config(workdir, config_json)
    writer = MetricsWriter(workdir / METRICS_FILE, resume_step=start if start else None,
                           enabled=is_main)
    shardings = exp.state_sharding(mesh)
    train_step = make_train_step(exp.objective, augment=_experiment.augment_kwargs(config),
                                 mesh=mesh, steps_per_epoch=exp.steps_per_epoch,
                                 state_sharding=shardings,
                                 compute_dtype=config.compute_dtype)
    eval_step = make_eval_step(mesh, state_sharding=shardings,
                               compute_dtype=config.compute_dtype)
    loop = _Loop(exp, mesh, ckpt, writer, log, train_step, eval_step, splits, config_json)
    state = loop.run(state, start)
    summary = loop.finish(state, time.time() - t_start)
  finally:
    ckpt.close()
  return state, summary


def _start_state(exp: Experiment, ckpt: Checkpoints, mesh: Mesh, workdir: pathlib.Path,
                 config_json: dict, log: _Printer) -> TrainState:
  """A fresh state (warm-started when ``init.from_workdir`` is set), or the newest
  periodic checkpoint's when ``ckpt`` has one."""
  start = ckpt.latest_step()
  if start is None:
    state = exp.init_state(mesh)
    if exp.config.init.from_workdir:
      state, _ = _warm.warm_start(state, exp.config.init.from_workdir, exp.config.init.which,
                                  log)
    return state
  _, old_config, _ = ckpt.restore_config(start)
  abstract = exp.abstract_state(mesh)
  tree, _ = ckpt.restore(abstract.to_tree(), start)
  spe = exp.steps_per_epoch
  log(f"[jaxdefense] resuming {workdir} from step {start} (epoch {start // spe}, "
      f"batch {start % spe}) of {exp.total_steps}.")
  changed = _config_diff(old_config, config_json)
  if changed:
    log("[jaxdefense] config differs from the checkpoint's: " + "; ".join(changed))
  return abstract.from_tree(tree)


def _write_config(workdir: pathlib.Path, config_json: dict) -> None:
  """``workdir/config.json``, replaced atomically."""
  tmp = workdir / (CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, workdir / CONFIG_FILE)


class _Loop:
  """The body of :func:`train_and_evaluate` (host-side bookkeeping)."""

  def __init__(self, exp: Experiment, mesh: Mesh, ckpt: Checkpoints,
               writer: MetricsWriter, log: _Printer, train_step: CompiledStep,
               eval_step: CompiledStep, splits: dict[str, Any], config_json: dict):
    self.exp, self.config, self.mesh, self.ckpt = exp, exp.config, mesh, ckpt
    self.writer, self.log = writer, log
    self.train_step, self.eval_step, self.splits = train_step, eval_step, splits
    self.config_json = config_json
    self.sharding = _sharding.batch_sharding(mesh)
    self.pending: list[dict] = []
    self.window: dict[str, float] = {}
    self.epoch_sums: dict[str, float] = {}
    self.last_train: dict[str, float] = {}
    self.last_pull_step = 0
    self.rate_start = 0
    self.last_rate: float | None = None
    self.last_pull_time = time.time()
    self.last_saved = -1

  # -------------------------------------------------------------- metrics
  def _pull(self, step: int) -> None:
    """Bring pending step metrics to the host, check them, log the window."""
    if not self.pending:
      return
    sums = _sum_metrics(self.pending)
    self.pending = []
    loss = sums.get("loss", 0.0)
    if not math.isfinite(loss):
      epoch = (step - 1) // self.exp.steps_per_epoch
      lr = _build.learning_rate_at(self.exp.schedule, max(step - 1, 0))
      saved = self.ckpt.latest_step()
      raise NonFiniteLossError(
          f"training loss became {loss} between steps {self.last_pull_step} and {step} "
          f"(epoch {epoch}, learning rate {lr:.4g}); stopped without saving (last good "
          f"checkpoint: {'none' if saved is None else f'step {saved}'}). Lower "
          f"optimizer.learning_rate, set optimizer.grad_clip_norm, or check the data.")
    for k, v in sums.items():
      self.window[k] = self.window.get(k, 0.0) + v
      self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
    self.last_pull_step = step

  def _restart_clock(self, step: int) -> None:
    """Time the steps after ``step`` only (after a compile, a save or an evaluation)."""
    self.rate_start = step
    self.last_pull_time = time.time()

  def _log_window(self, step: int, bar: Any) -> None:
    now = time.time()
    timed = step - self.rate_start
    if timed > 0:
      self.last_rate = timed / max(now - self.last_pull_time, 1e-9)
    rate = self.last_rate      # the steps of a window run at the rate of its timed ones
    record = {"kind": "train", "step": step,
              "epoch": step / self.exp.steps_per_epoch,
              "learning_rate": _build.learning_rate_at(self.exp.schedule, step - 1),
              **_averages(self.window)}
    if rate:
      record["steps_per_second"] = rate
    self.writer.write(record)
    if "loss" in record:
      bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}",
                      refresh=False)
    self.window = {}
    self._restart_clock(step)

  # ---------------------------------------------------------- checkpoints
  def _save(self, state: TrainState, step: int, extra: dict | None = None) -> None:
    if step == self.last_saved:
      return
    meta = {"epoch": step // self.exp.steps_per_epoch, **self.exp.info(), **(extra or {})}
    self.ckpt.save(state.to_tree(), self.config_json, meta)
    self.last_saved = step

  def _evaluate(self, state: TrainState, split: str) -> dict[str, float]:
    return evaluate(state, self.splits[split], self.config.eval_batch_size, mesh=self.mesh,
                    eval_step=self.eval_step)

  # ----------------------------------------------------------------- loop
  def run(self, state: TrainState, start: int) -> TrainState:
    exp, config = self.exp, self.config
    spe, total = exp.steps_per_epoch, exp.total_steps
    every = config.checkpoint.every_steps
    log_every = max(int(config.log_every_steps), 1)
    self.last_pull_step = start
    self._restart_clock(start)
    self.last_saved = start if self.ckpt.latest_step() == start else -1
    step = start
    bar = tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                    disable=(None if config.progress_bar else True) if
                    jax.process_index() == 0 else True, leave=False,
                    desc=exp.describe())
    try:
      while step < total:
        epoch, first = divmod(step, spe)
        self.epoch_sums = {}
        for x, y in _data.batches(self.splits["train"], config.batch_size, seed=config.seed,
                                  epoch=epoch, start=first):
          xb, yb = _sharding.shard_batch((x, y), self.sharding)
          state, metrics = self.train_step(state, xb, yb)
          step += 1
          self.pending.append(metrics)
          bar.update(1)
          if step == start + 1:
            # the first step compiles (or loads) the program: keep it out of the rate
            jax.block_until_ready(metrics)
            self._restart_clock(step)
          if step % log_every == 0:
            self._pull(step)
            self._log_window(step, bar)
          if every > 0 and step % every == 0 and step < total:
            self._pull(step)
            self._save(state, step)
            self._restart_clock(step)
          if step >= total:
            break
        self._pull(step)
        if self.window:
          self._log_window(step, bar)
        if step % spe == 0:
          self._end_epoch(state, step)
          self._restart_clock(step)
    finally:
      bar.close()
    return state

  def _end_epoch(self, state: TrainState, step: int) -> None:
    config = self.config
    epoch = step // self.exp.steps_per_epoch  # epochs completed
    record: dict[str, Any] = {"kind": "epoch", "step": step, "epoch": float(epoch)}
    train = _averages(self.epoch_sums)
    if train:
      self.last_train = train
    record.update({f"train/{k}": v for k, v in train.items()})
    val = None
    if "validation" in self.splits and epoch % max(config.eval_every_epochs, 1) == 0:
      val = self._evaluate(state, "validation")
      record.update({f"validation/{k}": v for k, v in val.items()})
    if config.test_every_epochs > 0 and epoch % config.test_every_epochs == 0:
      record.update({f"test/{k}": v for k, v in self._evaluate(state, "test").items()})
    self.writer.write(record)
    if val is not None and self.ckpt.keeps_best:
      meta = {"epoch": epoch, **self.exp.info(), "validation": val}
      self.ckpt.save(state.to_tree(), self.config_json, meta, best=True, metrics=val)
    if config.checkpoint.every_steps <= 0 and step < self.exp.total_steps:
      self._save(state, step)

  def finish(self, state: TrainState, elapsed: float) -> str:
    """Final checkpoint, evaluation, metrics record; returns the end-of-run table."""
    step = int(jax.device_get(state.step))
    self._save(state, step)
    rows = []
    final: dict[str, Any] = {"kind": "final", "step": step,
                             "epoch": step / self.exp.steps_per_epoch}
    if self.last_train:
      rows.append({"split": "train (running)", "loss": self.last_train.get("loss"),
                   "accuracy": self.last_train.get("accuracy"),
                   "examples": len(self.splits["train"].labels)})
      final.update({f"train/{k}": v for k, v in self.last_train.items()})
    for split in ("validation", "test"):
      if split in self.splits:
        m = self._evaluate(state, split)
        rows.append({"split": split, "loss": m["loss"], "accuracy": m["accuracy"],
                     "examples": m["count"]})
        final.update({f"{split}/{k}": v for k, v in m.items()})
        if split == "validation" and self.ckpt.keeps_best:
          meta = {"epoch": step // self.exp.steps_per_epoch, **self.exp.info(), "validation": m}
          self.ckpt.save(state.to_tree(), self.config_json, meta, best=True, metrics=m)
    if self.train_step.traces > 1 or self.eval_step.traces > 1:
      self.log(f"[jaxdefense] warning: the train step was traced {self.train_step.traces} "
               f"times and the eval step {self.eval_step.traces} times (expected once each); "
               "something changes shapes, dtypes or static values between steps.")
    final.update({"train_step_traces": self.train_step.traces,
                  "eval_step_traces": self.eval_step.traces,
                  "devices": int(self.mesh.size), "seconds": elapsed})
    self.writer.write(final)
    title = (f"{self.exp.describe()}: step {step}/{self.exp.total_steps} "
             f"({step / self.exp.steps_per_epoch:.3g} epochs) on {self.mesh.size} "
             f"{self.mesh.devices.flat[0].platform} device(s), {elapsed:.1f} s")
    return format_table(rows, ["split", "loss", "accuracy", "examples"], title=title)
