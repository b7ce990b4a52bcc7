"""Training-step overhead of LAD over its base objective (issue 13), side by side.

The LAD study (``experiments/lad/small.py``) records each run's training time, but its
cells ran at different times on a shared machine, so their ratios carry the machine's
load.  Here the six objectives of the study (PGD-AT, TRADES and their Lie–Trotter and
Strang–Marchuk LAD versions, the study's exact configs: pre-activation ResNet-8,
Fashion-MNIST-shaped batches of 128, 5 inner steps at eps 0.1, eta 0.05) are compiled
first and then timed in interleaved rounds (one step of each per round), so that a
loaded machine slows them alike; we report the median step time, its 10-90 % range
and the ratio of medians against the base objective.

Run: ``python benchmarks/lad_overhead.py [--rounds 15] [--batch 128] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

import jaxdefense as jd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "experiments", "lad"))
import small as lad_small  # noqa: E402  (the study's configs, one definition)

OBJECTIVES = ("pgd", "lad_pgd", "lad_sm_pgd", "trades", "lad_trades", "lad_sm_trades")
BASE_OF = {"lad_pgd": "pgd", "lad_sm_pgd": "pgd", "lad_trades": "trades",
           "lad_sm_trades": "trades"}


def build_step(name: str, batch: int):
  """The study's config for ``name`` as a compiled step, a fresh state and a batch."""
  config = lad_small.STUDY.config(name, 0)
  exp = jd.training.build_experiment(config, num_classes=10, image_shape=(28, 28, 1),
                                     steps_per_epoch=config.train_size // batch)
  a = config.augment   # the study's augmentation (pad 2, crop, flip) runs in the step
  augment = {"pad": int(a.pad), "crop": bool(a.crop), "flip": bool(a.flip)}
  step = jd.training.make_train_step(exp.objective, augment=augment if a.enabled else None,
                                     donate=False)
  state = jax.jit(exp.init_fn())(exp.root_key())
  rng = np.random.default_rng(0)
  x = jax.numpy.asarray(rng.uniform(size=(batch, 28, 28, 1)).astype(np.float32))
  y = jax.numpy.asarray(rng.integers(0, 10, size=batch).astype(np.int32))
  t = time.perf_counter()
  jax.block_until_ready(step(state, x, y))
  return (lambda: step(state, x, y)), time.perf_counter() - t


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  if args.rounds < 3 or args.batch < 1:
    p.error(f"--rounds must be >= 3 and --batch >= 1; got {args.rounds} and {args.batch}.")
  steps, compile_s = {}, {}
  for name in OBJECTIVES:
    steps[name], compile_s[name] = build_step(name, args.batch)
    print(f"compiled {name:15s} {compile_s[name]:6.1f} s (first call)", flush=True)
  times = {n: [] for n in OBJECTIVES}
  for r in range(args.rounds):
    for name in OBJECTIVES:
      t = time.perf_counter()
      jax.block_until_ready(steps[name]())
      times[name].append(time.perf_counter() - t)
    print(f"round {r + 1}/{args.rounds}, load {os.getloadavg()[0]:.1f}", flush=True)
  rows = []
  med = {n: statistics.median(v) for n, v in times.items()}
  print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}, backend {jax.default_backend()}, batch {args.batch}, "
        f"{args.rounds} rounds, load at end {os.getloadavg()[0]:.2f}")
  print(f"{'objective':15s} {'median ms':>10s} {'10-90 %':>16s} {'vs base':>8s}")
  for name in OBJECTIVES:
    lo, hi = np.percentile(times[name], [10, 90])
    base = BASE_OF.get(name)
    ratio = med[name] / med[base] if base else 1.0
    rows.append({"objective": name, "median_s": med[name], "p10_s": lo, "p90_s": hi,
                 "base": base, "ratio_over_base": ratio, "compile_s": compile_s[name]})
    print(f"{name:15s} {med[name] * 1e3:10.1f} {lo * 1e3:7.1f}-{hi * 1e3:<8.1f} "
          f"{ratio:7.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "batch": args.batch, "rounds": args.rounds,
                 "cpu_count": os.cpu_count(), "jax": jax.__version__,
                 "backend": jax.default_backend()}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
