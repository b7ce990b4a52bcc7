"""The training loop: ``train_and_evaluate``, ``restore`` and checkpoint evaluation."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.sharding import Mesh

from jaxdefense import _checks
from jaxdefense import data as _data
from jaxdefense.configs._base import validate as _validate_config
from jaxdefense.training import _build
from jaxdefense.training import _sharding
from jaxdefense.training._checkpoint import BEST, LATEST, Checkpoints
from jaxdefense.training._metrics import MetricsWriter, format_table
from jaxdefense.training._state import TrainState, create_train_state
from jaxdefense.training._steps import CompiledStep, evaluate, make_eval_step, make_train_step

__all__ = ["NonFiniteLossError", "Experiment", "build_experiment", "train_and_evaluate",
           "restore", "evaluate_checkpoint", "METRICS_FILE", "CONFIG_FILE"]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite; training stopped without saving."""


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run builds from its config before touching data or devices.

  Attributes:
    config: the validated config.
    model: the flax module (an ``Ensemble`` when ``ensemble.size > 1``).
    schedule: learning rate as a function of the step.
    tx: the optax optimizer.
    objective: the training objective.
    num_classes: number of classes of the data set.
    image_shape: ``(H, W, C)``.
    steps_per_epoch: optimizer steps per epoch (full batches only).
    total_steps: steps of the whole run.
  """
  config: ml_collections.ConfigDict
  model: Any
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  objective: Any
  num_classes: int
  image_shape: tuple[int, int, int]
  steps_per_epoch: int
  total_steps: int

  def init_fn(self) -> Callable[[jax.Array], TrainState]:
    """``key -> TrainState`` at step 0 (pure; jit or eval_shape it)."""
    sample = jnp.zeros((1,) + tuple(self.image_shape), jnp.float32)
    return lambda key: create_train_state(self.model, self.tx, sample, key)

  def root_key(self) -> jax.Array:
    """``PRNGKey(config.seed)``."""
    return jax.random.PRNGKey(self.config.seed)

  def abstract_state(self, mesh: Mesh) -> TrainState:
    """The state's structure with ``ShapeDtypeStruct`` leaves, replicated on ``mesh``."""
    rep = _sharding.replicated(mesh)
    shapes = jax.eval_shape(self.init_fn(), self.root_key())
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)

  def init_state(self, mesh: Mesh) -> TrainState:
    """A fresh state, created directly replicated on ``mesh``."""
    return jax.jit(self.init_fn(), out_shardings=_sharding.replicated(mesh))(self.root_key())

  def info(self) -> dict[str, Any]:
    """What a checkpoint must remember to rebuild this experiment without data."""
    return {"num_classes": self.num_classes, "image_shape": list(self.image_shape),
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}

  def describe(self) -> str:
    """e.g. ``resnet8 (euler_maruyama) on digits``."""
    return _describe(self.config)


def build_experiment(config: ml_collections.ConfigDict, *, num_classes: int,
                     image_shape: Sequence[int], steps_per_epoch: int,
                     total_steps: int | None = None) -> Experiment:
  """Build the model, schedule, optimizer and objective of ``config``.

  Args:
    config: a config (completed with defaults by ``jaxdefense.configs.validate``).
    num_classes: classes of the data set.
    image_shape: ``(H, W, C)`` of the images.
    steps_per_epoch: optimizer steps per epoch (for epoch milestones).
    total_steps: run length in steps (default ``epochs * steps_per_epoch``, or
      ``num_train_steps`` when positive).

  Returns:
    An :class:`Experiment`.

  Raises:
    ValueError / TypeError: bad config values (unknown model, step rule, optimizer...).
  """
  config = _validate_config(config)
  if total_steps is None:
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else config.epochs * steps_per_epoch)
  model = _build.build_model(config, num_classes)
  schedule = _build.build_schedule(config, steps_per_epoch, total_steps)
  tx = _build.build_optimizer(config, schedule)
  objective = _build.build_objective(config.objective)
  return Experiment(config=config, model=model, schedule=schedule, tx=tx,
                    objective=objective, num_classes=int(num_classes),
                    image_shape=tuple(int(s) for s in image_shape),
                    steps_per_epoch=int(steps_per_epoch), total_steps=int(total_steps))


def _augment_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  a = config.augment
  if not a.enabled or not (a.flip or (a.crop and a.pad > 0)):
    return None
  return {"pad": int(a.pad), "crop": bool(a.crop), "flip": bool(a.flip)}


def _load_splits(config: ml_collections.ConfigDict) -> dict[str, _data.Dataset]:
  kw = {"data_dir": config.data_dir, "validation_size": config.validation_size,
        "seed": config.seed}
  train = _data.load(config.dataset, "train", **kw)
  size = _checks.check_int(config.train_size, "train_size", minimum=0)
  out = {"train": train.take(size) if size else train}
  if config.validation_size > 0:
    out["validation"] = _data.load(config.dataset, "validation", **kw)
  out["test"] = _data.load(config.dataset, "test", data_dir=config.data_dir)
  return out


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out.extend(_config_diff(a, b, f"{prefix}{k}."))
    elif json.dumps(a) != json.dumps(b):
      out.append(f"{prefix}{k}: {a!r} -> {b!r}")
  return out


def _config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


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
      missing fields take their defaults).
    workdir: folder for checkpoints, ``metrics.jsonl`` and ``config.json``.
    mesh: device mesh (default ``make_mesh()`` over ``jax.devices()``).
    verbose: print resume notes and the final table (process 0 only).

  Returns:
    The final :class:`TrainState`.

  Raises:
    ValueError: unknown data set, model, config key or value; ``batch_size`` or
      ``eval_batch_size`` not divisible by the device count; a batch larger than the
      training set.
    CheckpointError: (a ``ValueError``) a checkpoint in ``workdir`` that is corrupt or
      does not match the config.
    NonFiniteLossError: (a ``FloatingPointError``) the loss became NaN or infinite.
    jaxdefense.data.DatasetNotFoundError: data not available locally.
  """
  t_start = time.time()
  config = _validate_config(config)
  workdir = pathlib.Path(workdir)
  log = _Printer(verbose)
  mesh = _sharding.make_mesh() if mesh is None else mesh
  _sharding.check_divisible(config.batch_size, mesh, "batch_size")
  _sharding.check_divisible(config.eval_batch_size, mesh, "eval_batch_size")
  splits = _load_splits(config)
  train_ds = splits["train"]
  n_train = int(train_ds.labels.shape[0])
  spe = _data.num_batches(n_train, config.batch_size, True)
  if spe == 0:
    raise ValueError(f"batch_size={config.batch_size} is larger than the {n_train} training "
                     f"examples of {config.dataset!r}.")
  exp = build_experiment(config, num_classes=train_ds.num_classes,
                         image_shape=train_ds.images.shape[1:], steps_per_epoch=spe)
  total = exp.total_steps
  is_main = jax.process_index() == 0
  config_json = _config_json(config)

  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  ckpt = Checkpoints(workdir, max_to_keep=config.checkpoint.max_to_keep,
                     keep_best=config.checkpoint.keep_best and "validation" in splits,
                     best_metric=config.checkpoint.best_metric)
  try:
    start = ckpt.latest_step()
    if start is None:
      state = exp.init_state(mesh)
    else:
      _, old_config, _ = ckpt.restore_config(start)
      abstract = exp.abstract_state(mesh)
      tree, _ = ckpt.restore(abstract.to_tree(), start)
      state = abstract.from_tree(tree)
      log(f"[jaxdefense] resuming {workdir} from step {start} (epoch {start // spe}, "
          f"batch {start % spe}) of {total}.")
      changed = _config_diff(old_config, config_json)
      if changed:
        log("[jaxdefense] config differs from the checkpoint's: " + "; ".join(changed))
    start = int(jax.device_get(state.step))
    if is_main:
      tmp = workdir / (CONFIG_FILE + ".tmp")
      tmp.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
      os.replace(tmp, workdir / CONFIG_FILE)
    writer = MetricsWriter(workdir / METRICS_FILE, resume_step=start if start else None,
                           enabled=is_main)
    train_step = make_train_step(exp.objective, augment=_augment_kwargs(config), mesh=mesh,
                                 steps_per_epoch=exp.steps_per_epoch)
    eval_step = make_eval_step(mesh)
    loop = _Loop(exp, config, mesh, ckpt, writer, log, train_step, eval_step, splits,
                 config_json)
    state = loop.run(state, start)
    summary = loop.finish(state, time.time() - t_start)
  finally:
    ckpt.close()
  if verbose and is_main:
    print(summary, flush=True)
  return state


class _Loop:
  """The body of :func:`train_and_evaluate` (host-side bookkeeping)."""

  def __init__(self, exp: Experiment, config: ml_collections.ConfigDict, mesh: Mesh,
               ckpt: Checkpoints, writer: MetricsWriter, log: _Printer,
               train_step: CompiledStep, eval_step: CompiledStep,
               splits: dict[str, Any], config_json: dict):
    self.exp, self.config, self.mesh, self.ckpt = exp, config, mesh, ckpt
    self.writer, self.log = writer, log
    self.train_step, self.eval_step, self.splits = train_step, eval_step, splits
    self.config_json = config_json
    self.sharding = _sharding.batch_sharding(mesh)
    self.pending: list[dict] = []
    self.window: dict[str, float] = {}
    self.epoch_sums: dict[str, float] = {}
    self.last_train: dict[str, float] = {}
    self.last_pull_step = 0
    self.window_start = 0
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

  def _log_window(self, step: int, bar: Any) -> None:
    now = time.time()
    done = step - self.window_start
    rate = done / max(now - self.last_pull_time, 1e-9)
    record = {"kind": "train", "step": step,
              "epoch": step / self.exp.steps_per_epoch,
              "learning_rate": _build.learning_rate_at(self.exp.schedule, step - 1),
              **_averages(self.window), "steps_per_second": rate}
    self.writer.write(record)
    if "loss" in record:
      bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}",
                      refresh=False)
    self.window = {}
    self.window_start = step
    self.last_pull_time = now

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
    self.window_start = start
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
          if step % log_every == 0:
            self._pull(step)
            self._log_window(step, bar)
          if every > 0 and step % every == 0 and step < total:
            self._pull(step)
            self._save(state, step)
          if step >= total:
            break
        self._pull(step)
        if self.window:
          self._log_window(step, bar)
        if step % spe == 0:
          self._end_epoch(state, step)
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


# ------------------------------------------------------------------ restore / eval
def _experiment_from_checkpoint(ckpt: Checkpoints, step: int | None, which: str
                                ) -> tuple[int, Experiment, dict]:
  step, config_dict, meta = ckpt.restore_config(step, which)
  config = _validate_config(config_dict)
  needed = ("num_classes", "image_shape", "steps_per_epoch", "total_steps")
  if any(k not in meta for k in needed):
    from jaxdefense.training._checkpoint import CheckpointError
    raise CheckpointError(f"checkpoint {ckpt.workdir}/{which}/{step} lacks metadata "
                          f"{[k for k in needed if k not in meta]}.")
  exp = build_experiment(config, num_classes=meta["num_classes"],
                         image_shape=meta["image_shape"],
                         steps_per_epoch=meta["steps_per_epoch"],
                         total_steps=meta["total_steps"])
  return step, exp, meta


def restore(workdir: str | os.PathLike, *, which: str = "latest", step: int | None = None,
            mesh: Mesh | None = None) -> tuple[TrainState, ml_collections.ConfigDict]:
  """Restore a checkpoint of a run and the config it was trained with.

  No data is loaded: the model and optimizer are rebuilt from the config and the
  metadata stored in the checkpoint.

  Args:
    workdir: the run's folder (as given to :func:`train_and_evaluate`).
    which: ``"latest"`` (periodic checkpoints) or ``"best"`` (best on validation).
    step: a specific step (default: the newest of ``which``).
    mesh: device mesh for the replicated state (default: all devices).

  Returns:
    ``(state, config)``: the :class:`TrainState` (``state.params``,
    ``state.model_state``, ``state.step``...) and the locked ``ConfigDict``.

  Raises:
    FileNotFoundError: no checkpoint in ``workdir``.
    CheckpointError: (a ``ValueError``) corrupt files or a checkpoint that does not
      match the model built from its own config.
    ValueError: ``which`` not "latest" or "best".
  """
  workdir = pathlib.Path(workdir)
  if which not in ("latest", "best"):
    raise ValueError(f"which must be 'latest' or 'best'; got {which!r}.")
  folder = workdir / (LATEST if which == "latest" else BEST)
  if not folder.is_dir():
    raise FileNotFoundError(f"no {which} checkpoints in {str(workdir)!r} (no folder "
                            f"{str(folder)!r}); train first, e.g. `jaxdefense train "
                            f"--config demo --workdir {workdir}`.")
  mesh = _sharding.make_mesh() if mesh is None else mesh
  ckpt = Checkpoints(workdir, keep_best=(which == "best"), read_only=True)
  try:
    step, exp, _ = _experiment_from_checkpoint(ckpt, step, which)
    abstract = exp.abstract_state(mesh)
    tree, _ = ckpt.restore(abstract.to_tree(), step, which)
  finally:
    ckpt.close()
  return abstract.from_tree(tree), exp.config


def evaluate_checkpoint(workdir: str | os.PathLike, *, which: str = "latest",
                        splits: Sequence[str] = ("test",), data_dir: str | None = None,
                        batch_size: int | None = None, mesh: Mesh | None = None
                        ) -> list[dict[str, Any]]:
  """Clean accuracy of a saved run on some splits of its data set.

  Args:
    workdir: the run's folder.
    which: ``"latest"`` or ``"best"``.
    splits: among ``"train"``, ``"validation"``, ``"test"`` (default test only).
    data_dir: overrides the config's ``data_dir``.
    batch_size: evaluation batch (default: the config's ``eval_batch_size``).
    mesh: device mesh.

  Returns:
    One row per split: ``{"split", "loss", "accuracy", "examples", "step", "run"}``
    (``run`` describes the model, e.g. ``"resnet8 (euler) on digits"``).

  Raises:
    FileNotFoundError / CheckpointError: see :func:`restore`.
    ValueError: unknown split; ``validation`` for a run without a validation split.
  """
  mesh = _sharding.make_mesh() if mesh is None else mesh
  state, config = restore(workdir, which=which, mesh=mesh)
  step = int(jax.device_get(state.step))
  run = _describe(config)
  eval_step = make_eval_step(mesh)
  bs = int(batch_size or config.eval_batch_size)
  rows = []
  for split in splits:
    if split not in _data.SPLITS:
      raise ValueError(f"split must be one of {list(_data.SPLITS)}; got {split!r}.")
    if split == "validation" and config.validation_size <= 0:
      raise ValueError(f"the run in {str(workdir)!r} has no validation split "
                       "(validation_size=0).")
    ds = _data.load(config.dataset, split, data_dir=data_dir or config.data_dir,
                    validation_size=config.validation_size if split != "test" else 0,
                    seed=config.seed)
    if split == "train" and config.train_size > 0:
      ds = ds.take(config.train_size)
    m = evaluate(state, ds, bs, mesh=mesh, eval_step=eval_step)
    rows.append({"split": split, "loss": m["loss"], "accuracy": m["accuracy"],
                 "examples": m["count"], "step": step, "run": run})
  return rows


def _describe(config: ml_collections.ConfigDict) -> str:
  c = config
  ens = (f" x{c.ensemble.size}{' shared' if c.ensemble.shared else ''}"
         if c.ensemble.size > 1 else "")
  return f"{c.model.name} ({c.model.step.name}){ens} on {c.dataset}"

