"""``jaxdefense demo [--quick] [--epochs N] [--workdir DIR]``: the quick-start demo.

A ResNet and an EnResNet on the bundled digits, trained, attacked with FGSM and PGD,
and compared in one table.  It sits on the top floor with the rest of the command line
(it trains with :mod:`jaxdefense.training` and attacks with :mod:`jaxdefense.evaluation`).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time
from typing import Any, Sequence

import jax

from jaxdefense import _checks, configs, evaluation, models, training
from jaxdefense._table import format_table
from jaxdefense.commands._base import Command, positive_int

__all__ = ["run_demo", "DEMO_VARIANTS", "DEMO_EPS", "DEMO_SUITE", "COMMAND"]

#: l-inf radius of the demo's attacks (digits have 17 grey levels, 1/16 apart).
DEMO_EPS = 0.1
#: the demo's attacks: FGSM and 10-step PGD (EOT over 5 draws for the EnResNet).
DEMO_SUITE = "fgsm,pgd:steps=10"

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
    quick: train for one epoch only (a smoke test; accuracies are low).  Default False.
    epochs: override the number of epochs, an int >= 1 (default None: the ``demo``
      config's; wins over ``quick``).
    overrides: more ``key=value`` config overrides for both runs (default none).
    verbose: print each run's table and the comparison (default True).

  Returns:
    One row per network: ``{"model", "params", "epochs", "test accuracy", "fgsm",
    "pgd-10", "seconds"}`` (accuracies as fractions; attacks at ``DEMO_EPS``).

  Raises:
    TypeError: ``epochs`` not an integer.
    ValueError: ``epochs < 1``, a bad override (from the config validation), and the
      errors of training and evaluation.
  """
  if epochs is not None:
    epochs = _checks.check_int(epochs, "epochs", minimum=1)
  rows = []
  with tempfile.TemporaryDirectory(prefix="jaxdefense_demo_") as tmp:
    root = pathlib.Path(workdir) if workdir is not None else pathlib.Path(tmp)
    for label, step_overrides in DEMO_VARIANTS:
      extra = dict(step_overrides)
      if quick:
        extra["epochs"] = 1
      if epochs is not None:
        extra["epochs"] = epochs
      config = configs.get("demo", [*overrides, *(f"{k}={v}" for k, v in extra.items())])
      if verbose:
        print(f"\n== {label}: {config.model.name}, {config.epochs} epochs on "
              f"{config.dataset} ==", flush=True)
      run_dir = root / config.model.step.name
      t0 = time.time()
      state = training.train_and_evaluate(config, run_dir, verbose=verbose)
      final = [r for r in training.read_metrics(run_dir / training.METRICS_FILE)
               if r.get("kind") == "final"]
      report, _ = evaluation.evaluate_run(run_dir, key=jax.random.key(0), suite=DEMO_SUITE,
                                          eps=DEMO_EPS, num_examples=None, progress=False)
      fgsm, pgd = report.attacks.values()
      rows.append({"model": label, "test accuracy": final[-1]["test/accuracy"],
                   "fgsm": fgsm, "pgd-10": pgd,
                   "params": models.count_params(jax.device_get(state.params)),
                   "epochs": config.epochs, "seconds": time.time() - t0})
  if verbose:
    print()
    print(format_table(rows, ["model", "params", "epochs", "test accuracy", "fgsm", "pgd-10",
                              "seconds"],
                       title=f"jaxdefense demo: digits (8x8), test accuracy clean and under "
                             f"attack at eps {DEMO_EPS} (EnResNet attacked with EOT over 5 "
                             "draws)",
                       percent=("test accuracy", "fgsm", "pgd-10"),
                       formats={"seconds": "{:.1f}"}),
          flush=True)
  return rows


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--quick", action="store_true", help="one epoch only (smoke test)")
  p.add_argument("--epochs", type=positive_int, default=None,
                 help="epochs per network, >= 1 (default: the demo config's)")
  p.add_argument("--workdir", default=None,
                 help="keep the runs here (default: a temporary folder)")


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
  run_demo(args.workdir, quick=args.quick, epochs=args.epochs, overrides=overrides)
  return 0


#: The ``demo`` subcommand.
COMMAND = Command("demo", "train a ResNet and an EnResNet on digits, attack both, compare them",
                  _add_arguments, _run, config_overrides=True)
