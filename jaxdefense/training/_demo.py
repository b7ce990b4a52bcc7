"""The quick-start demo: a ResNet and an EnResNet on the bundled digits, side by side."""

from __future__ import annotations

import os
import pathlib
import tempfile
import time
from typing import Any, Sequence

import jax

from jaxdefense import models
from jaxdefense.configs import _loader
from jaxdefense.training._loop import METRICS_FILE, train_and_evaluate
from jaxdefense.training._metrics import format_table, read_metrics

__all__ = ["run_demo", "DEMO_VARIANTS"]

#: ``(label, step-rule overrides)`` of the networks the demo trains.
DEMO_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ResNet (Euler)", {"model.step.name": "euler"}),
    ("EnResNet (Euler-Maruyama, a=0.1)", {"model.step.name": "euler_maruyama",
                                          "model.step.coef": 0.1}),
)


def run_demo(workdir: str | os.PathLike | None = None, *, quick: bool = False,
             epochs: int | None = None, overrides: Sequence[str] = (),
             verbose: bool = True) -> list[dict[str, Any]]:
  """Train the ``demo`` config with an Euler and an Euler-Maruyama step; compare them.

  Both networks are ResNet-8s on the 8x8 digits (1437 training, 360 test images); the
  EnResNet adds Gaussian noise after every residual block, in training and at test
  time (evaluated with a fixed noise key).  The full demo takes about a minute on two
  CPU cores.

  Args:
    workdir: folder for the two runs (``euler/``, ``euler_maruyama/``); a temporary
      folder, deleted at the end, by default.  Existing runs there are resumed.
    quick: train for one epoch only (a smoke test; accuracies are low).
    epochs: override the number of epochs.
    overrides: more ``key=value`` config overrides for both runs.
    verbose: print each run's table and the comparison.

  Returns:
    One row per network: ``{"model", "step", "params", "test accuracy", "seconds"}``.
  """
  rows = []
  with tempfile.TemporaryDirectory(prefix="jaxdefense_demo_") as tmp:
    root = pathlib.Path(workdir) if workdir is not None else pathlib.Path(tmp)
    for label, step_overrides in DEMO_VARIANTS:
      extra = dict(step_overrides)
      if quick:
        extra["epochs"] = 1
      if epochs is not None:
        extra["epochs"] = int(epochs)
      config = _loader.get("demo", [*overrides, *(f"{k}={v}" for k, v in extra.items())])
      if verbose:
        print(f"\n== {label}: {config.model.name}, {config.epochs} epochs on "
              f"{config.dataset} ==", flush=True)
      run_dir = root / config.model.step.name
      t0 = time.time()
      state = train_and_evaluate(config, run_dir, verbose=verbose)
      seconds = time.time() - t0
      final = [r for r in read_metrics(run_dir / METRICS_FILE) if r.get("kind") == "final"]
      rows.append({"model": label, "test accuracy": final[-1]["test/accuracy"],
                   "params": models.count_params(jax.device_get(state.params)),
                   "epochs": config.epochs, "seconds": seconds})
  if verbose:
    print()
    print(format_table(rows, ["model", "params", "epochs", "test accuracy", "seconds"],
                       title="jaxdefense demo: digits (8x8), clean test accuracy",
                       percent=("test accuracy",), formats={"seconds": "{:.1f}"}),
          flush=True)
  return rows
