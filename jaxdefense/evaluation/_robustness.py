"""Robustness tables: clean, per-attack and per-corruption accuracy of any model.

The runner takes a :class:`~jaxdefense.models.ModelFn` (``jaxdefense.models.bind``), or
for compatibility a plain function: ``logits_fn(x) -> logits`` for a deterministic
model, or ``logits_fn(x, key) -> logits`` with ``stochastic=True`` for a noisy one
(EnResNet), converted once at the entry.  Stochastic models are attacked with EOT automatically (the gradient is
the mean over ``eot_samples`` noise draws) and classified with one fresh noise draw
per evaluation, as the EnResNet authors' test code does.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxdefense import _checks
from jaxdefense import attacks as _attacks
from jaxdefense import data as _data
from jaxdefense import models as _models
from jaxdefense._table import format_table

Array = jax.Array

# name -> (attack function name in jaxdefense.attacks, default keyword arguments)
ATTACKS: dict[str, tuple[str, dict[str, Any]]] = {
    "fgsm": ("fgsm", {}),
    "ifgsm": ("ifgsm", {"steps": 20}),
    "pgd": ("pgd", {"steps": 20}),
    "mifgsm": ("mifgsm", {"steps": 20, "mu": 0.8}),
    "cw": ("cw_linf", {"steps": 50, "lr": 6e-4, "c": 10.0, "kappa": 0.0}),
    "apgd-ce": ("apgd", {"loss": "ce", "steps": 100}),
    "apgd-dlr": ("apgd", {"loss": "dlr", "steps": 100}),
    "spsa": ("spsa", {"steps": 100, "num_samples": 64}),
}

SUITES: dict[str, tuple[str, ...]] = {
    "quick": ("fgsm", "pgd"),
    # the EnResNet paper's white-box suite: IFGSM-20 steps of 2/255 at eps 8/255
    "enresnet": ("fgsm", "ifgsm:steps=20,step_fraction=1/4", "cw"),
    "inresnet": ("fgsm", "ifgsm", "pgd"),         # In-ResNet's attack columns
    "diffai": ("mifgsm",),                        # DiffAI's attacked accuracy (mu 0.8, 20 it.)
    "strong": ("pgd", "apgd-ce", "apgd-dlr"),
    "full": ("fgsm", "ifgsm", "pgd", "mifgsm", "cw", "apgd-ce", "apgd-dlr", "spsa"),
}


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One attack of a suite: a display ``name``, the attack function and its kwargs.

  ``step_fraction`` (optional) sets the step size relative to the radius the attack
  runs at, ``step_size = step_fraction * eps`` (the papers' "2/255 at 8/255"), so one
  spec serves every eps of an accuracy-vs-eps curve.
  """
  name: str
  fn: Callable[..., Array]
  kwargs: Mapping[str, Any]
  step_fraction: float | None = None

  def run(self, logits_fn: Any, x: Array, y: Array, key: Array, eps: Any) -> Array:
    kwargs = dict(self.kwargs)
    if self.step_fraction is not None:
      kwargs["step_size"] = self.step_fraction * eps
    return self.fn(logits_fn, x, y, key=key, eps=eps, **kwargs)


def _literal(text: str) -> Any:
  """Parse ``8/255``, ``0.1``, ``20``, ``ce``, ``True`` in an attack spec."""
  text = text.strip()
  if "/" in text:
    num, den = text.split("/", 1)
    return float(num) / float(den)
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_attack(spec: str | AttackSpec) -> AttackSpec:
  """Parse ``"name"`` or ``"name:key=value,key=value"`` into an :class:`AttackSpec`.

  Names: ``fgsm, ifgsm, pgd, mifgsm, cw, apgd-ce, apgd-dlr, spsa``.  Values may be
  fractions (``step_size=2/255``).  Example: ``"pgd:steps=50,restarts=2"``;
  ``step_fraction=1/4`` gives a step of ``eps / 4`` at whatever eps the attack runs.

  Raises:
    ValueError: unknown attack name or a malformed ``key=value`` item.
  """
  if isinstance(spec, AttackSpec):
    return spec
  name, _, rest = str(spec).partition(":")
  name = name.strip().lower()
  if name not in ATTACKS:
    raise ValueError(f"unknown attack {name!r} in spec {spec!r}; expected one of "
                     f"{sorted(ATTACKS)} (optionally 'name:key=value,...').")
  fn_name, defaults = ATTACKS[name]
  kwargs = dict(defaults)
  label = name
  if rest:
    for item in rest.split(","):
      key, eq, value = item.partition("=")
      if not eq or not key.strip():
        raise ValueError(f"attack spec {spec!r}: expected 'key=value' items, got {item!r}.")
      kwargs[key.strip()] = _literal(value)
    label = f"{name}({rest})"
  elif "steps" in kwargs and name not in ("cw",):
    label = f"{name}-{kwargs['steps']}"
  fraction = kwargs.pop("step_fraction", None)
  if fraction is not None:
    if "step_size" in kwargs:
      raise ValueError(f"attack spec {spec!r}: give step_size or step_fraction, not both.")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or fraction <= 0:
      raise ValueError(f"attack spec {spec!r}: step_fraction must be a number > 0 "
                       f"(step_size = step_fraction * eps); got {fraction!r}.")
    fraction = float(fraction)
  return AttackSpec(label, getattr(_attacks, fn_name), kwargs, fraction)


def parse_suite(suite: str | Sequence[str | AttackSpec]) -> list[AttackSpec]:
  """A suite name from :data:`SUITES`, a comma list (``"fgsm,pgd:steps=50"``) or specs.

  Raises:
    ValueError: an unknown suite or attack name.
  """
  if isinstance(suite, str):
    if suite in SUITES:
      return [parse_attack(s) for s in SUITES[suite]]
    items = [s for s in _split_top(suite) if s]
    if not items:
      raise ValueError(f"suite {suite!r} names no attack; suites: {sorted(SUITES)}.")
    return [parse_attack(s) for s in items]
  return [parse_attack(s) for s in suite]


def _split_top(text: str) -> list[str]:
  """Split ``"fgsm,pgd:steps=5,restarts=2,cw"`` at commas that start a new attack."""
  parts: list[str] = []
  for piece in text.split(","):
    piece = piece.strip()
    head = piece.partition(":")[0].strip().lower()
    if parts and "=" in piece and head not in ATTACKS:
      parts[-1] += "," + piece
    else:
      parts.append(piece)
  return parts


@dataclasses.dataclass
class RobustnessReport:
  """Accuracies of one model: clean, under each attack, under each corruption.

  Attributes:
    eps: the l-inf radius of the attacks (pixel units in [0, 1]).
    num_examples: number of evaluated examples.
    clean: clean accuracy (fraction).
    attacks: attack name -> robust accuracy.
    corruptions: corruption kind -> {severity: accuracy}.
    meta: free-form description (model, data set, EOT samples...).
  """
  eps: float
  num_examples: int
  clean: float
  attacks: dict[str, float] = dataclasses.field(default_factory=dict)
  corruptions: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def rows(self) -> list[dict[str, Any]]:
    """One row per evaluation: ``{"evaluation", "accuracy"}`` (+ eps for attacks)."""
    rows = [{"evaluation": "clean", "eps": None, "accuracy": self.clean}]
    rows += [{"evaluation": k, "eps": self.eps, "accuracy": v} for k, v in self.attacks.items()]
    for kind, per in self.corruptions.items():
      sev = ",".join(str(s) for s in sorted(per))
      rows.append({"evaluation": f"{kind} (sev {sev})", "eps": None,
                   "accuracy": float(np.mean(list(per.values())))})
    return rows

  def to_text(self, title: str | None = None) -> str:
    """An aligned plain-text table."""
    return format_table(self.rows(), ["evaluation", "eps", "accuracy"], title=title,
                        formats={"eps": "{:.4f}"})

  def to_markdown(self, title: str | None = None) -> str:
    """A markdown table."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| evaluation | eps | accuracy |", "|---|---:|---:|"]
    for r in self.rows():
      eps = "" if r["eps"] is None else f"{r['eps']:.4f}"
      lines.append(f"| {r['evaluation']} | {eps} | {100 * r['accuracy']:.2f} % |")
    return "\n".join(lines)

  def to_json(self) -> dict[str, Any]:
    return {"eps": self.eps, "num_examples": self.num_examples, "clean": self.clean,
            "attacks": dict(self.attacks),
            "corruptions": {k: {str(s): a for s, a in v.items()}
                            for k, v in self.corruptions.items()},
            "meta": self.meta}

  def save(self, directory: str | os.PathLike, stem: str = "robustness") -> tuple[str, str]:
    """Write ``<stem>.md`` and ``<stem>.json`` into ``directory``; return both paths."""
    os.makedirs(directory, exist_ok=True)
    md = os.path.join(directory, f"{stem}.md")
    js = os.path.join(directory, f"{stem}.json")
    with open(md, "w") as f:
      f.write(self.to_markdown(self.meta.get("title")) + "\n")
    with open(js, "w") as f:
      json.dump(self.to_json(), f, indent=2)
    return md, js


def as_model(logits_fn: Any, stochastic: bool = False) -> _models.ModelFn:
  """The :class:`~jaxdefense.models.ModelFn` of an entry point's ``logits_fn`` argument.

  A ``ModelFn`` is returned as it is (its own ``stochastic`` flag counts; passing
  ``stochastic=True`` for a deterministic one is an error); a plain function is wrapped
  with :meth:`ModelFn.wrap` and the explicit ``stochastic`` flag (``f(x)``, or
  ``f(x, key)`` when ``stochastic``).

  Raises:
    TypeError: ``logits_fn`` is not callable.
    ValueError: ``stochastic=True`` for a deterministic ``ModelFn``.
  """
  return _models.ModelFn.wrap(logits_fn, stochastic=bool(stochastic))


def _attacked(model: _models.ModelFn, eot_samples: int) -> Any:
  """What attacks see: the model itself, or EOT over ``eot_samples`` noise draws."""
  return _attacks.eot(model, eot_samples) if model.stochastic else model


def _accuracy(fn: Callable[[tuple, Array], Array], x: np.ndarray, y: np.ndarray,
              key: Array, batch_size: int, desc: str, progress: bool) -> float:
  """Mean of ``fn((xb, yb), key_b) -> correct [B]`` over the data (the batch runner)."""
  correct = _data.run_batches(fn, (x, y), batch_size=batch_size, key=key,
                              progress=progress, desc=desc)
  return float(np.mean(correct))


def _check_data(images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(images, dtype=np.float32) if not isinstance(images, np.ndarray) else images
  y = np.asarray(labels)
  _checks.check_images(x, "images")
  _checks.check_labels(y, None, "labels", batch=x.shape[0])
  return x, y


def evaluate_robustness(logits_fn: Any, images: Any, labels: Any, *, key: Array,
                        eps: float = 8 / 255, suite: Any = "quick",
                        corruptions: Sequence[str] = (), severities: Sequence[int] = (1, 2, 3, 4, 5),
                        stochastic: bool = False, eot_samples: int = 5, batch_size: int = 128,
                        progress: bool = True, meta: Mapping[str, Any] | None = None
                        ) -> RobustnessReport:
  """Clean, per-attack and per-corruption accuracy of a model.

  Every evaluation runs through ``jaxdefense.data.run_batches`` (fixed-shape padded
  batches sharded over all devices, compiled once); batch ``i`` of an evaluation gets
  ``fold_in(k, i)`` of that evaluation's key ``k``.

  Args:
    logits_fn: the model: a :class:`~jaxdefense.models.ModelFn`
      (``jaxdefense.models.bind(module, variables)``; its ``stochastic`` flag counts),
      or a plain ``f(x [B, H, W, C]) -> logits [B, K]`` (with ``stochastic=True``,
      ``f(x, key) -> logits``).
    images: ``[N, H, W, C]`` floats in [0, 1] (NumPy or JAX).
    labels: ``[N]`` integer labels.
    key: PRNG key (attacks, noise draws and corruptions derive from it).
    eps: l-inf radius of every attack, in [0, 1] pixel units (default 8/255).
    suite: a suite name (``quick``, ``enresnet``, ``inresnet``, ``diffai``, ``strong``,
      ``full``), a comma list of attack specs, or a list of them (see
      :func:`parse_attack`); ``()`` for none.
    corruptions: noise corruptions from :func:`jaxdefense.data.corruption_kinds`.
    severities: corruption severities (1..5), each reported.
    stochastic: a plain ``logits_fn`` draws noise (``f(x, key)``); attacks then use EOT
      over ``eot_samples`` draws.  Default False.
    eot_samples: noise draws per EOT gradient (EnResNet: 5).
    batch_size: examples per compiled call (the last batch is padded, so every call
      has the same shape and nothing recompiles).
    progress: show tqdm bars.
    meta: stored in the report (e.g. model and data set names).

  Returns:
    A :class:`RobustnessReport`.

  Raises:
    ValueError / TypeError: bad images, labels, eps, suite, corruption or batch size, a
      non-callable ``logits_fn``, ``stochastic=True`` for a deterministic ``ModelFn``.
  """
  model = as_model(logits_fn, stochastic)
  x, y = _check_data(images, labels)
  _checks.check_eps(eps, "eps")
  batch_size = _checks.check_int(batch_size, "batch_size", minimum=1)
  specs = [] if suite in ((), None, "") else parse_suite(suite)
  for kind in corruptions:
    _checks.check_choice(kind, "corruptions", _data.corruption_kinds())
  for s in severities:
    _checks.check_int(s, "severities", minimum=1, maximum=5)
  return _evaluate(model, x, y, key=key, eps=eps, specs=specs, corruptions=corruptions,
                   severities=severities, eot_samples=eot_samples, batch_size=batch_size,
                   progress=progress, meta=meta)


def _evaluate(model: _models.ModelFn, x: np.ndarray, y: np.ndarray, *, key: Array,
              eps: float, specs: Sequence[AttackSpec], corruptions: Sequence[str] = (),
              severities: Sequence[int] = (), eot_samples: int, batch_size: int,
              progress: bool, meta: Mapping[str, Any] | None = None) -> RobustnessReport:
  """:func:`evaluate_robustness` on checked arguments."""
  attacked = _attacked(model, eot_samples)
  k_clean, k_attack, k_corrupt = jax.random.split(key, 3)

  def clean_correct(batch, kb):
    xb, yb = batch
    return jnp.argmax(model(xb, kb), -1) == yb

  report = RobustnessReport(eps=float(eps), num_examples=int(x.shape[0]),
                            clean=_accuracy(clean_correct, x, y, k_clean, batch_size,
                                            "clean", progress),
                            meta={"stochastic": model.stochastic,
                                  "eot_samples": eot_samples if model.stochastic else None,
                                  **dict(meta or {})})
  for i, spec in enumerate(specs):
    def attacked_correct(batch, kb, spec=spec):
      xb, yb = batch
      ka, kp = jax.random.split(kb)
      x_adv = spec.run(attacked, xb, yb, ka, eps)
      return jnp.argmax(model(x_adv, kp), -1) == yb
    report.attacks[spec.name] = _accuracy(attacked_correct, x, y,
                                          jax.random.fold_in(k_attack, i), batch_size,
                                          spec.name, progress)
  for i, kind in enumerate(corruptions):
    per: dict[int, float] = {}
    for s in severities:
      def corrupted_correct(batch, kb, kind=kind, s=s):
        xb, yb = batch
        kc, kp = jax.random.split(kb)
        return jnp.argmax(model(_data.corrupt(xb, kind, s, kc), kp), -1) == yb
      per[int(s)] = _accuracy(corrupted_correct, x, y,
                              jax.random.fold_in(k_corrupt, 10 * i + s), batch_size,
                              f"{kind}-{s}", progress)
    report.corruptions[kind] = per
  return report


def accuracy_vs_eps(logits_fn: Any, images: Any, labels: Any, *, key: Array,
                    eps_values: Sequence[float], attack: str = "pgd",
                    stochastic: bool = False, eot_samples: int = 5, batch_size: int = 128,
                    progress: bool = False) -> list[tuple[float, float]]:
  """Robust accuracy of one attack at several radii: ``[(eps, accuracy), ...]``.

  ``eps = 0`` gives the clean accuracy.  Used for accuracy-vs-eps plots and by the
  gradient-masking diagnostics.  Every radius uses the same ``key`` (as separate
  :func:`evaluate_robustness` calls would).

  Args:
    logits_fn, stochastic, eot_samples, batch_size, progress: as
      :func:`evaluate_robustness`.
    images: ``[N, H, W, C]`` in [0, 1]; labels: ``[N]`` integer labels.
    key: PRNG key.
    eps_values: radii in [0, 1].
    attack: one attack spec (see :func:`parse_attack`); default ``"pgd"``.

  Returns:
    ``[(eps, accuracy), ...]`` in the order of ``eps_values``.

  Raises:
    ValueError / TypeError: as :func:`evaluate_robustness`.
  """
  model = as_model(logits_fn, stochastic)
  x, y = _check_data(images, labels)
  for e in eps_values:
    _checks.check_eps(e, "eps_values")
  batch_size = _checks.check_int(batch_size, "batch_size", minimum=1)
  spec = parse_attack(attack)
  return _curve(model, x, y, key=key, eps_values=eps_values, spec=spec,
                eot_samples=eot_samples, batch_size=batch_size, progress=progress)


def _curve(model: _models.ModelFn, x: np.ndarray, y: np.ndarray, *, key: Array,
           eps_values: Sequence[float], spec: AttackSpec, eot_samples: int,
           batch_size: int, progress: bool) -> list[tuple[float, float]]:
  """:func:`accuracy_vs_eps` on checked arguments."""
  out = []
  for e in eps_values:
    rep = _evaluate(model, x, y, key=key, eps=float(e), specs=() if e == 0 else [spec],
                    eot_samples=eot_samples, batch_size=batch_size, progress=progress)
    out.append((float(e), rep.clean if e == 0 else next(iter(rep.attacks.values()))))
  return out


def plot_accuracy_vs_eps(curves: Mapping[str, Sequence[tuple[float, float]]], path: str,
                         title: str = "Robust accuracy vs eps") -> str:
  """Plot robust accuracy against the radius, one line per model, to a PNG file.

  Args:
    curves: ``{label: [(eps, accuracy), ...]}`` with eps in ``[0, 1]`` pixel units
      (drawn in 1/255 units) and accuracies as fractions (drawn in percent), e.g. the
      output of :func:`accuracy_vs_eps`.
    path: the image file to write (matplotlib picks the format from the suffix).
    title: the plot title.

  Returns:
    ``path``.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for label, pts in curves.items():
    e, a = zip(*pts)
    ax.plot([255 * v for v in e], [100 * v for v in a], marker="o", label=label)
  ax.set_xlabel("eps (x 1/255)")
  ax.set_ylabel("accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


__all__ = ["ATTACKS", "SUITES", "AttackSpec", "RobustnessReport", "accuracy_vs_eps",
           "evaluate_robustness", "parse_attack", "parse_suite", "plot_accuracy_vs_eps"]
