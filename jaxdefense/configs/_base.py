"""The configuration schema: every field a training run reads, with its default.

Presets and user config files start from :func:`base_config` and change a few fields
(practice 2 of STYLE.md).  :func:`validate` completes a partial config with these
defaults and rejects unknown keys, wrong types and out-of-range values (each named by
its dotted config key), so the training loop can read every field without ``.get``
fallbacks or checks of its own.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterator

import ml_collections
from ml_collections import config_dict

from jaxdefense import _checks

__all__ = ["base_config", "validate", "flatten_keys", "FREE_GROUPS", "VALUE_CHOICES",
           "VALUE_RANGES"]

#: Groups whose extra keys are passed through as keyword arguments (model overrides,
#: objective hyper-parameters, step-rule fields) rather than rejected.
FREE_GROUPS = ("model", "model.step", "objective")

def base_config() -> ml_collections.ConfigDict:
  """The full default configuration (unlocked), documented field by field.

  Returns:
    A ``ConfigDict`` with the fields below (defaults in brackets)::

      seed [0]                 init key, data order and validation hold-out
      dataset ["digits"]       jaxdefense.data.names(): digits, mnist, fashion_mnist, cifar10...
      data_dir [None]          folder searched first by jaxdefense.data.load
      validation_size [0]      training examples held out for validation / best checkpoint
      train_size [0]           if > 0, train on the first train_size examples left after
                               the hold-out (small-scale experiments); 0: all of them
      batch_size [128]         global training batch (divisible by the device count)
      eval_batch_size [500]    evaluation batch (divisible by the device count)
      epochs [10]              training length in epochs
      num_train_steps [-1]     if > 0, stop after this many steps instead
      compute_dtype ["float32"]  float32 | bfloat16 | float16: mixed precision of the
                               train and eval steps (forward and backward passes and the
                               objective's attacks) on float32 parameters, losses and
                               batch statistics (models.bind(compute_dtype=...)); for
                               accelerators (XLA:CPU has no fast bfloat16 convolutions)
      augment.enabled [True]   on-device augmentation in the train step (data.augment)
      augment.pad [4]          random-crop padding in pixels
      augment.crop [True]      random padded crop
      augment.flip [True]      random horizontal flip (off for digits / MNIST)
      model.name ["resnet20"]  jaxdefense.models.names()
      model.normalize [True]   per-channel normalisation with data.channel_stats(dataset)
      model.step.name [None]   residual step rule: euler | euler_maruyama | damped, plus
                               its fields (jaxdefense.dynamics.step_from_dict; defaults
                               from the rule).  None: the model's own rule (Euler for
                               the plain zoo, Euler-Maruyama for en*_ presets); fields
                               given without a name change the model's own rule
      model.<other>            any other key is a model override, e.g. model.dropout=0.3
      ensemble.size [1]        > 1 wraps the model in models.Ensemble
      ensemble.shared [False]  shared weights (n x En_1) instead of independent members
      ensemble.member_devices [1]  > 1 splits the members of a non-shared ensemble over
                               this many devices of each process (a ("member", "data")
                               mesh: data.make_mesh(members=...)); the batch is split
                               over the remaining factor
      optimizer.name ["sgd"]   sgd | adam | adamw
      optimizer.learning_rate [0.1]
      optimizer.momentum [0.9] (sgd; 0 disables)
      optimizer.nesterov [False]
      optimizer.weight_decay [5e-4]
      optimizer.decoupled_weight_decay [False]  False: L2 added to the gradient before
                               momentum, as PyTorch SGD/Adam do (the papers' 5e-4);
                               True: decoupled, p -= lr * wd * p (SGDW / AdamW)
      optimizer.b1 [0.9], optimizer.b2 [0.999], optimizer.eps [1e-8]  (adam / adamw)
      optimizer.grad_clip_norm [0.0]  > 0 clips the global gradient norm
      schedule.name ["piecewise"]  constant | piecewise | cosine
      schedule.milestones [()] epochs at which piecewise multiplies the rate by factor
      schedule.factor [0.1]
      schedule.warmup_epochs [0.0]  linear warm-up from 0 (any schedule)
      schedule.final_factor [0.0]   cosine: final rate = final_factor * learning_rate
      objective.name ["natural"]    plus the objective's keyword arguments
      checkpoint.every_steps [0]    0: save at the end of each epoch
      checkpoint.max_to_keep [2]
      checkpoint.keep_best [True]   also keep the best checkpoint on validation
      checkpoint.best_metric ["accuracy"]  accuracy (max) or loss (min)
      init.from_workdir [None] start from the weights of another run's checkpoint: every
                               array whose path it also has is copied, the rest (e.g.
                               the damping of an In-ResNet warm-started from a ResNet,
                               the authors' "pretrain") keeps its initial value; step,
                               optimizer state and data order start fresh
      init.which ["best"]      the source checkpoint: best | latest
      log_every_steps [50]     train metrics to metrics.jsonl (and NaN check) cadence
      eval_every_epochs [1]    validation cadence
      test_every_epochs [0]    0: test only at the end of the run
      progress_bar [True]      tqdm bar (shown only on a TTY)
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dataset = "digits"
  c.data_dir = config_dict.placeholder(str)
  c.validation_size = 0
  c.train_size = 0
  c.batch_size = 128
  c.eval_batch_size = 500
  c.epochs = 10
  c.num_train_steps = -1

  c.augment = ml_collections.ConfigDict()
  c.augment.enabled = True
  c.augment.pad = 4
  c.augment.crop = True
  c.augment.flip = True

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet20"
  c.model.normalize = True
  c.model.step = ml_collections.ConfigDict({"name": config_dict.placeholder(str)})

  c.compute_dtype = "float32"

  c.ensemble = ml_collections.ConfigDict()
  c.ensemble.size = 1
  c.ensemble.shared = False
  c.ensemble.member_devices = 1

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 5e-4
  c.optimizer.decoupled_weight_decay = False
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 0.0

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "piecewise"
  c.schedule.milestones = ()
  c.schedule.factor = 0.1
  c.schedule.warmup_epochs = 0.0
  c.schedule.final_factor = 0.0

  c.objective = ml_collections.ConfigDict()
  c.objective.name = "natural"

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 0
  c.checkpoint.max_to_keep = 2
  c.checkpoint.keep_best = True
  c.checkpoint.best_metric = "accuracy"

  c.init = ml_collections.ConfigDict()
  c.init.from_workdir = config_dict.placeholder(str)
  c.init.which = "best"

  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.test_every_epochs = 0
  c.progress_bar = True
  return c


def flatten_keys(config: Any, prefix: str = "") -> Iterator[str]:
  """Dotted paths of every leaf (and group) of a ConfigDict, depth first."""
  for key in config.keys():
    path = f"{prefix}{key}"
    yield path
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from flatten_keys(value, path + ".")


def _is_free(path: str) -> bool:
  parent = path.rpartition(".")[0]
  return parent in FREE_GROUPS


def _tupled(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_tupled(v) for v in value)
  if isinstance(value, tuple):
    return tuple(_tupled(v) for v in value)
  return value


def _compatible(default: Any, value: Any) -> bool:
  if default is None or value is None:
    return True
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(default, bool) and isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, int):
    return isinstance(value, int)
  if isinstance(default, tuple):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def unknown_key_error(path: str, known: list[str]) -> ValueError:
  """A ``ValueError`` for an unknown config key, listing close matches."""
  close = difflib.get_close_matches(path, known, n=4, cutoff=0.6)
  if not close:  # try matching the last component only
    last = path.rpartition(".")[2]
    close = [k for k in known if difflib.get_close_matches(last, [k.rpartition(".")[2]],
                                                           n=1, cutoff=0.75)][:4]
  hint = f" Close matches: {', '.join(close)}." if close else ""
  group = path.rpartition(".")[0]
  siblings = sorted(k.rpartition(".")[2] for k in known
                    if k.rpartition(".")[0] == group and k != path)
  where = f"group {group!r}" if group else "the top level"
  return ValueError(f"unknown config key {path!r}.{hint} Keys at {where}: "
                    f"{', '.join(siblings)}.")


def _merge(base: ml_collections.ConfigDict, user: ml_collections.ConfigDict, prefix: str,
           known: list[str]) -> None:
  for key in user.keys():
    path = f"{prefix}{key}"
    value = user[key]
    if key not in base:
      if prefix.rstrip(".") in FREE_GROUPS:
        base[key] = _tupled(value.to_dict() if isinstance(value, ml_collections.ConfigDict)
                            else value)
        continue
      raise unknown_key_error(path, known)
    default = base[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        raise TypeError(f"config key {path!r} is a group of fields "
                        f"({', '.join(default.keys())}); got {value!r}.")
      _merge(default, ml_collections.ConfigDict(value) if isinstance(value, dict) else value,
             path + ".", known)
      continue
    if not _compatible(default, value):
      raise TypeError(f"config key {path!r} must be of type {type(default).__name__} "
                      f"(default {default!r}); got {value!r} of type {type(value).__name__}.")
    ref_type = base.get_ref(key).get_type() if default is None else None
    if ref_type is not None and value is not None and not isinstance(value, ref_type):
      raise TypeError(f"config key {path!r} must be a {ref_type.__name__} or None; "
                      f"got {value!r}.")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    base[key] = _tupled(value)


#: ``(dotted key, minimum, maximum)`` of the numeric schema fields (``None``: no bound);
#: :func:`validate` rejects values outside, naming the key.  Integer fields are counts and
#: sizes, float fields rates and factors (also required finite).  ``epochs`` is checked
#: apart: >= 1, or >= 0 when ``num_train_steps > 0`` sets the run length.
VALUE_RANGES: tuple[tuple[str, float | None, float | None], ...] = (
    ("seed", 0, None),
    ("validation_size", 0, None),
    ("train_size", 0, None),
    ("batch_size", 1, None),
    ("eval_batch_size", 1, None),
    ("augment.pad", 0, None),
    ("ensemble.size", 1, None),
    ("ensemble.member_devices", 1, None),
    ("optimizer.learning_rate", 0.0, None),
    ("optimizer.momentum", 0.0, 1.0),
    ("optimizer.weight_decay", 0.0, None),
    ("optimizer.b1", 0.0, 1.0),
    ("optimizer.b2", 0.0, 1.0),
    ("optimizer.eps", 0.0, None),
    ("optimizer.grad_clip_norm", 0.0, None),
    ("schedule.factor", 0.0, None),
    ("schedule.warmup_epochs", 0.0, None),
    ("schedule.final_factor", 0.0, None),
    ("checkpoint.every_steps", 0, None),
    ("checkpoint.max_to_keep", 1, None),
    ("log_every_steps", 0, None),
    ("eval_every_epochs", 0, None),
    ("test_every_epochs", 0, None),
)


#: ``(dotted key, allowed values)`` of the string fields with a fixed set of values that
#: no builder checks first.
VALUE_CHOICES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("compute_dtype", ("float32", "bfloat16", "float16")),
    ("init.which", ("best", "latest")),
    ("checkpoint.best_metric", ("accuracy", "loss")),
)


def _at(config: ml_collections.ConfigDict, path: str) -> Any:
  """The value at the dotted ``path`` (``"optimizer.momentum"``, ``"compute_dtype"``)."""
  node = config
  for part in path.split("."):
    node = node[part]
  return node


def _check_values(config: ml_collections.ConfigDict) -> None:
  """Range checks of a complete config (see :data:`VALUE_RANGES`)."""
  for path, lo, hi in VALUE_RANGES:
    value = _at(config, path)
    name = f"config key {path!r}"
    if isinstance(value, float) or isinstance(lo, float):
      _checks.check_float(value, name, minimum=lo, maximum=hi)
    else:
      _checks.check_int(value, name, minimum=lo, maximum=hi)
  for path, choices in VALUE_CHOICES:
    if _at(config, path) not in choices:
      raise ValueError(f"config key {path!r} must be one of {choices}; "
                       f"got {_at(config, path)!r}.")
  epochs = _checks.check_int(config.epochs, "config key 'epochs'")
  if config.num_train_steps > 0 and epochs < 0:
    raise ValueError(f"config key 'epochs' must be >= 0; got {epochs}.")
  if config.num_train_steps <= 0 and epochs < 1:
    raise ValueError(f"config key 'epochs' must be >= 1 (the run length in epochs; or set "
                     f"num_train_steps > 0); got {epochs}.")


def validate(config: ml_collections.ConfigDict | dict) -> ml_collections.ConfigDict:
  """Complete ``config`` with the defaults of :func:`base_config` and check it.

  Missing fields take their defaults; JSON lists become tuples.  Extra keys are
  allowed only in the free groups ``model`` (model overrides), ``model.step`` (step-rule
  fields) and ``objective`` (objective keyword arguments).

  Args:
    config: a (possibly partial) ``ConfigDict`` or nested ``dict``.

  Returns:
    A new, locked ``ConfigDict`` with every field of the schema.

  Raises:
    ValueError: an unknown key (the message lists close matches); a numeric field out
      of its range (:data:`VALUE_RANGES`: e.g. ``epochs < 1`` without
      ``num_train_steps``, ``batch_size`` or ``eval_batch_size < 1``, a negative
      ``train_size``, ``validation_size`` or ``seed``), named by its dotted key.
    TypeError: a value whose type does not match the field's default.
  """
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  if not isinstance(config, ml_collections.ConfigDict):
    raise TypeError(f"config must be an ml_collections.ConfigDict; got {type(config).__name__}.")
  out = base_config()
  known = list(flatten_keys(out))
  _merge(out, config, "", known)
  _check_values(out)
  out.lock()
  return out
