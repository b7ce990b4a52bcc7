"""Inference overhead of EnResNet's noise injection against the plain ResNet.

The EnResNet paper (Wang et al. 2019, Sec. 3.4) reports negligible overhead: ResNet20
vs En_1 ResNet20, batch 1K on a Titan Xp, 1.6941 s vs 1.6943 s over 100 runs and the
same 4807 MB peak memory.  Here: the jit-compiled forward pass (``train=False``, noise
on at test time as in the paper) of ``preact_resnet20`` against ``en_preact_resnet20``
and the same En_1 with the fused ``sampler="fast"`` (``NAME:fast`` rows; see
``jaxdefense.dynamics.fast_normal``) and with random signs (``sampler="rademacher"``,
the simplified weak Euler scheme, not Gaussian), and, without ``--quick``, the ensembles ``en2``/``en5``, the noise-free ``ens2`` and the
shared-weights ``swe5``) on a CIFAR-shaped batch.

Timing: every model is compiled first (compile time reported apart), then the models
run in interleaved rounds (one call of each per round, a fresh noise key per call) so
that a loaded machine slows them alike; we report the median and the 10-90 % range.
Memory: XLA's ``compiled.memory_analysis()`` of each forward pass (arguments, outputs
and temporaries: the peak buffer footprint of the executable), plus the process's peak
RSS at the end.

Run: ``python benchmarks/enresnet_overhead.py [--quick] [--batch 128] [--repeats 30]
[--prng threefry2x32|rbg]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdefense as jd
import jaxdefense.models._enresnet  # noqa: F401  (registers the EnResNet presets)

QUICK = ("preact_resnet20", "en_preact_resnet20", "en_preact_resnet20:fast",
         "en_preact_resnet20:rademacher")
FULL = QUICK + ("en2_preact_resnet20", "en2_preact_resnet20:fast", "en5_preact_resnet20",
                "en5_preact_resnet20:fast", "ens2_preact_resnet20", "swe5_preact_resnet20")


def _create(name: str):
  """``NAME`` or ``NAME:SAMPLER`` (the EnResNet with ``sampler="fast"`` or
  ``"rademacher"``)."""
  base, _, sampler = name.partition(":")
  return jd.models.create(base, sampler=sampler) if sampler else jd.models.create(base)


def random_variables(model, x, seed: int = 0):
  """He-scaled random variables for ``model`` (values do not affect the timing)."""
  rng = np.random.default_rng(seed)
  key = jax.random.key(0)
  shapes = jax.eval_shape(lambda: model.init({"params": key, "noise": key}, x))

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "var" in name or "scale" in name:
      return jnp.ones(s.shape, s.dtype)
    if "kernel" not in name:  # biases, BN means and shifts
      return jnp.zeros(s.shape, s.dtype)
    fan_in = int(np.prod(s.shape[-4:-1] if len(s.shape) >= 4 else s.shape[-2:-1])) or 1
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _mb(nbytes: float) -> float:
  return nbytes / 2 ** 20


def bench(names, batch: int, repeats: int, prng: str, seed: int = 0):
  x = jax.random.uniform(jax.random.key(seed), (batch, 32, 32, 3))
  rows = {}
  runners = {}
  for name in names:
    model = _create(name)
    v = random_variables(model, x)
    # train=False passed positionally: flax's nn.vmap (Ensemble) drops keyword arguments.
    fn = jax.jit(lambda v, x, k, model=model: model.apply(v, x, False, rngs={"noise": k}))
    k0 = jax.random.key(0, impl=prng)
    t = time.perf_counter()
    compiled = fn.lower(v, x, k0).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(v, x, k0))  # warm-up
    runners[name] = (compiled, v)
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes
             + mem.temp_size_in_bytes - getattr(mem, "alias_size_in_bytes", 0))
    rows[name] = {"params": jd.models.count_params(v), "compile_s": compile_s,
                  "args_mb": _mb(mem.argument_size_in_bytes),
                  "temp_mb": _mb(mem.temp_size_in_bytes), "total_mb": _mb(total),
                  "times": []}
  keys = jax.random.split(jax.random.key(seed + 1, impl=prng), repeats)
  for r in range(repeats):
    for name in names:
      compiled, v = runners[name]
      t = time.perf_counter()
      jax.block_until_ready(compiled(v, x, keys[r]))
      rows[name]["times"].append(time.perf_counter() - t)
  return rows


def report(rows, base: str, batch: int, repeats: int, prng: str) -> None:
  print(f"# EnResNet inference overhead  (batch {batch} x 32x32x3, train=False, noise on at "
        f"test, {repeats} interleaved rounds, PRNG {prng})")
  print(f"# {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}, 1-min load average {os.getloadavg()[0]:.1f}")
  head = (f"{'model':<31}{'params':>10}{'compile s':>11}{'median ms':>11}{'p10-p90 ms':>15}"
          f"{'x time':>8}{'args MB':>9}{'temp MB':>9}{'total MB':>10}{'x mem':>7}")
  print(head)
  print("-" * len(head))
  b = rows[base]
  b_med = statistics.median(b["times"])
  for name, r in rows.items():
    ts = np.asarray(r["times"]) * 1e3
    med = float(np.median(ts))
    p10, p90 = np.percentile(ts, [10, 90])
    print(f"{name:<31}{r['params']:>10,}{r['compile_s']:>11.2f}{med:>11.2f}"
          f"{f'{p10:.1f}-{p90:.1f}':>15}{med / (b_med * 1e3):>8.3f}{r['args_mb']:>9.2f}"
          f"{r['temp_mb']:>9.2f}{r['total_mb']:>10.2f}{r['total_mb'] / b['total_mb']:>7.3f}")
  for name, label in (("en_preact_resnet20", "jax.random sampler"),
                      ("en_preact_resnet20:fast", "fast sampler"),
                      ("en_preact_resnet20:rademacher", "random signs")):
    en = rows.get(name)
    if en is not None:
      ratio = statistics.median(en["times"]) / b_med
      print(f"En_1 ({label}) / plain ResNet20: time x{ratio:.3f} "
            f"({(ratio - 1) * 100:+.1f} %), memory x{en['total_mb'] / b['total_mb']:.3f} "
            f"({en['total_mb'] - b['total_mb']:+.2f} MB)")
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(f"process peak RSS: {rss / 1024 if sys.platform != 'darwin' else rss / 2**20:.0f} MB")


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="plain vs En_1 only, 5 rounds (default: 6 models, 30 rounds)")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--prng", default="threefry2x32", choices=("threefry2x32", "rbg",
                                                            "unsafe_rbg"),
                 help="PRNG implementation of the noise key")
  args = p.parse_args(argv)
  names = QUICK if args.quick else FULL
  repeats = args.repeats or (5 if args.quick else 30)
  rows = bench(names, args.batch, repeats, args.prng)
  report(rows, "preact_resnet20", args.batch, repeats, args.prng)


if __name__ == "__main__":
  main()
