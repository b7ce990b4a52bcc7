"""What a run builds from its validated config: data, mesh, model, objective, optimizer.

Every function here except :func:`build_experiment` takes a config that
``jaxdefense.configs.validate`` has already completed and checked (the entry points
``train_and_evaluate`` and ``restore`` validate once) and never validates it again.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from jaxdefense import _checks
from jaxdefense import configs as _configs
from jaxdefense import data as _data
from jaxdefense import models as _models
from jaxdefense.data import _sharding
from jaxdefense.training import _build
from jaxdefense.training._state import TrainState, create_train_state

__all__ = ["Experiment", "build_experiment"]


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
    """``key -> TrainState`` at step 0 (pure; jit or eval_shape it).

    The model is initialised on a zero batch of shape ``[1, H, W, C]`` (float32).
    """
    sample = jnp.zeros((1,) + tuple(self.image_shape), jnp.float32)
    return lambda key: create_train_state(self.model, self.tx, sample, key)

  def root_key(self) -> jax.Array:
    """``PRNGKey(config.seed)``: the root key of the run (shape ``[2]``, uint32)."""
    return jax.random.PRNGKey(self.config.seed)

  @property
  def stacked_members(self) -> bool:
    """Whether the model is a non-shared ensemble (variables with a member axis)."""
    return isinstance(self.model, _models.Ensemble) and not self.model.shared

  def on_mesh(self, mesh: Mesh) -> "Experiment":
    """This experiment for ``mesh``: an ensemble's members split over its ``"member"``
    axis when it has one of more than one device (``Ensemble.member_mesh``).

    Raises:
      ValueError: a member axis for a model that is not a non-shared ensemble.
    """
    k = _sharding.member_size(mesh)
    if k == 1:
      return self
    if not self.stacked_members:
      raise ValueError(
          f"ensemble.member_devices={k} splits an ensemble's members over devices, but "
          f"the model ({describe(self.config)}) is not an ensemble of independent "
          "members (ensemble.size > 1, ensemble.shared=False): set "
          "ensemble.member_devices=1.")
    return dataclasses.replace(self, model=self.model.clone(member_mesh=mesh))

  def state_sharding(self, mesh: Mesh) -> Any:
    """The sharding of every leaf of the training state on ``mesh``: replicated, except
    an ensemble's stacked variables and their optimizer moments on a mesh with a
    ``"member"`` axis (``jaxdefense.data.state_sharding``)."""
    return jax.tree_util.tree_map(lambda s: s.sharding, self.abstract_state(mesh))

  def abstract_state(self, mesh: Mesh) -> TrainState:
    """The state's structure with ``ShapeDtypeStruct`` leaves placed on ``mesh``
    (replicated, or members split as :meth:`state_sharding` says).

    Nothing is computed (``jax.eval_shape``); this is the target a checkpoint is
    restored into.
    """
    cached = self._abstract_cache().get(mesh)
    if cached is not None:
      return cached
    shapes = jax.eval_shape(self.init_fn(), self.root_key())
    shardings = _sharding.state_sharding(shapes, mesh, self.stacked_members)
    return self._remember(mesh, jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings))

  def init_state(self, mesh: Mesh) -> TrainState:
    """A fresh state at step 0, created directly on ``mesh`` (see :meth:`state_sharding`).

    The initialiser is traced once: when every leaf is replicated (no ensemble split
    over a ``"member"`` axis) one sharding serves the whole state, and the structure
    that :meth:`abstract_state` returns is read off the new state (tracing a Flax
    model's ``init`` costs a fraction of a second, which a first result waits for).
    """
    if self.stacked_members and _sharding.member_size(mesh) > 1:
      return jax.jit(self.init_fn(), out_shardings=self.state_sharding(mesh))(self.root_key())
    state = jax.jit(self.init_fn(), out_shardings=_sharding.replicated(mesh))(self.root_key())
    if mesh not in self._abstract_cache():
      self._remember(mesh, jax.tree_util.tree_map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state))
    return state

  def _abstract_cache(self) -> dict:
    """``{mesh: abstract state}`` of this experiment (shapes never change for it)."""
    cache = self.__dict__.get("_abstract")
    if cache is None:
      cache = {}
      object.__setattr__(self, "_abstract", cache)   # a cache, not a field
    return cache

  def _remember(self, mesh: Mesh, abstract: TrainState) -> TrainState:
    self._abstract_cache()[mesh] = abstract
    return abstract

  def info(self) -> dict[str, Any]:
    """What a checkpoint must remember to rebuild this experiment without data.

    Returns:
      ``{"num_classes": int, "image_shape": [H, W, C], "steps_per_epoch": int,
      "total_steps": int}`` (JSON-ready).
    """
    return {"num_classes": self.num_classes, "image_shape": list(self.image_shape),
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps}

  def describe(self) -> str:
    """e.g. ``resnet8 (euler_maruyama) on digits``."""
    return describe(self.config)


def build_experiment(config: ml_collections.ConfigDict, *, num_classes: int,
                     image_shape: Sequence[int], steps_per_epoch: int,
                     total_steps: int | None = None) -> Experiment:
  """Build the model, schedule, optimizer and objective of ``config``.

  This is an entry point: ``config`` is completed and checked with
  ``jaxdefense.configs.validate`` here (once).

  Args:
    config: a config (missing fields take the defaults of
      ``jaxdefense.configs.base_config``).
    num_classes: classes of the data set.
    image_shape: ``(H, W, C)`` of the images.
    steps_per_epoch: optimizer steps per epoch (for epoch milestones).
    total_steps: run length in steps (default ``epochs * steps_per_epoch``, or
      ``num_train_steps`` when positive).

  Returns:
    An :class:`Experiment` whose ``config`` is the validated config.

  Raises:
    ValueError / TypeError: bad config values (unknown key, model, step rule,
      optimizer...).
  """
  return make_experiment(_configs.validate(config), num_classes=num_classes,
                         image_shape=image_shape, steps_per_epoch=steps_per_epoch,
                         total_steps=total_steps)


def make_experiment(config: ml_collections.ConfigDict, *, num_classes: int,
                    image_shape: Sequence[int], steps_per_epoch: int,
                    total_steps: int | None = None) -> Experiment:
  """:func:`build_experiment` for an already validated ``config`` (not re-validated)."""
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


def training_mesh(config: ml_collections.ConfigDict, mesh: Mesh | None) -> Mesh:
  """``mesh`` (default: every device, with a ``"member"`` axis of
  ``ensemble.member_devices`` devices when that is above 1), checked to split both
  batch sizes evenly.

  Raises:
    ValueError: ``batch_size`` or ``eval_batch_size`` not divisible by the number of
      devices the batch is split over; ``ensemble.member_devices`` not dividing the
      devices of a process.
  """
  if mesh is None:
    try:
      mesh = _sharding.make_mesh(members=config.ensemble.member_devices)
    except ValueError as e:
      raise ValueError(f"ensemble.member_devices: {e}") from None
  _sharding.check_divisible(config.batch_size, mesh, "batch_size")
  _sharding.check_divisible(config.eval_batch_size, mesh, "eval_batch_size")
  return mesh


def load_splits(config: ml_collections.ConfigDict) -> dict[str, _data.Dataset]:
  """The run's data: ``train`` (first ``train_size`` rows when positive), ``validation``
  (when ``validation_size > 0``) and ``test``.

  Raises:
    ValueError: a negative ``train_size``; see ``jaxdefense.data.load``.
    jaxdefense.data.DatasetNotFoundError: data not available locally.
  """
  kw = {"data_dir": config.data_dir, "validation_size": config.validation_size,
        "seed": config.seed}
  train = _data.load(config.dataset, "train", **kw)
  size = _checks.check_int(config.train_size, "train_size", minimum=0)
  out = {"train": train.take(size) if size else train}
  if config.validation_size > 0:
    out["validation"] = _data.load(config.dataset, "validation", **kw)
  out["test"] = _data.load(config.dataset, "test", data_dir=config.data_dir)
  return out


def experiment_for_data(config: ml_collections.ConfigDict,
                        train: _data.Dataset) -> Experiment:
  """The :class:`Experiment` of ``config`` sized by its training set ``train``.

  Raises:
    ValueError: ``batch_size`` larger than the training set (no full batch).
  """
  n_train = int(train.labels.shape[0])
  spe = _data.num_batches(n_train, config.batch_size, True)
  if spe == 0:
    raise ValueError(f"batch_size={config.batch_size} is larger than the {n_train} training "
                     f"examples of {config.dataset!r}.")
  return make_experiment(config, num_classes=train.num_classes,
                         image_shape=train.images.shape[1:], steps_per_epoch=spe)


def augment_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """The train step's augmentation arguments, or None when it augments nothing."""
  a = config.augment
  if not a.enabled or not (a.flip or (a.crop and a.pad > 0)):
    return None
  return {"pad": int(a.pad), "crop": bool(a.crop), "flip": bool(a.flip)}


def config_json(config: ml_collections.ConfigDict) -> dict:
  """``config`` as plain JSON data (what ``config.json`` and checkpoints store)."""
  return json.loads(config.to_json())


def describe(config: ml_collections.ConfigDict) -> str:
  """A one-line name of the run, e.g. ``resnet8 (euler) x4 shared on digits``."""
  c = config
  ens = (f" x{c.ensemble.size}{' shared' if c.ensemble.shared else ''}"
         if c.ensemble.size > 1 else "")
  step = f" ({c.model.step.name})" if c.model.step.name else ""  # None: the model's own
  return f"{c.model.name}{step}{ens} on {c.dataset}"
