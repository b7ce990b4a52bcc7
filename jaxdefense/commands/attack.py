"""``jaxdefense attack --workdir DIR [--suite S] [--eps E] [--corruptions C,...]``.

Attacks a saved run with an attack suite (and noise corruptions), prints the table and
writes ``DIR/robustness.md`` and ``DIR/robustness.json`` (see
:func:`jaxdefense.evaluation.evaluate_run`).
"""

from __future__ import annotations

import argparse
import sys

import jax

from jaxdefense import evaluation
from jaxdefense.commands._base import Command, parse_eps

__all__ = ["COMMAND"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", required=True, help="a training run's folder")
  p.add_argument("--which", choices=("latest", "best"), default="latest")
  p.add_argument("--suite", default="quick",
                 help="suite name (quick, enresnet, inresnet, diffai, strong, full) or a "
                      "comma list of attacks, e.g. 'fgsm,pgd:steps=50,restarts=2'")
  p.add_argument("--eps", type=parse_eps, default=8 / 255,
                 help="l-inf radius in [0, 1] units; fractions allowed (default 8/255)")
  p.add_argument("--corruptions", default="",
                 help="comma list: gaussian_noise,shot_noise,impulse_noise,speckle_noise")
  p.add_argument("--num_examples", type=int, default=1000,
                 help="first N test examples (0: all)")
  p.add_argument("--eot_samples", type=int, default=5)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--diagnose", action="store_true", help="also run the gradient-masking checks")
  p.add_argument("--data_dir", default=None)


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
  del overrides  # not accepted (config_overrides=False)
  corruptions = tuple(c.strip() for c in args.corruptions.split(",") if c.strip())
  report, diagnosis = evaluation.evaluate_run(
      args.workdir, key=jax.random.key(args.seed), which=args.which, suite=args.suite,
      eps=args.eps, num_examples=args.num_examples or None, corruptions=corruptions,
      eot_samples=args.eot_samples, batch_size=args.batch_size, data_dir=args.data_dir,
      progress=sys.stderr.isatty(), with_diagnosis=args.diagnose)
  print(report.to_text(title=report.meta.get("title")))
  if diagnosis is not None:
    print()
    print(diagnosis.to_text())
  print(f"\nwritten: {args.workdir}/robustness.md, robustness.json")
  return 0


#: The ``attack`` subcommand.
COMMAND = Command("attack", "attack a saved run with an attack suite and noise corruptions",
                  _add_arguments, _run)
