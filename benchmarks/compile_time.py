"""Time to a first result: compile time of the demo and of a ResNet-20 training step,
cold and with the persistent compilation cache.

Run from the repository root::

  python benchmarks/compile_time.py                 # demo --quick and the train step
  python benchmarks/compile_time.py --case step     # one case
  python benchmarks/compile_time.py --out compile.json

Each measurement is a fresh Python process (JAX's in-memory caches start empty), with
``jaxdefense._compile_log.CompileLog`` summing JAX's own compile events: tracing,
lowering to MLIR, XLA backend compiles and persistent-cache loads.  Per case:

* ``cold``: an empty persistent cache folder (what a first run pays);
* ``warm``: the same folder again (what every later run pays);
* ``no cache``: the persistent cache disabled (``--compile_cache none``).

Cases:

* ``demo``: ``jaxdefense demo --quick`` (a ResNet and an EnResNet on digits, one
  epoch each, attacked), as the README's first command runs it with ``--quick``;
* ``step``: ``models.create("resnet20")`` and one jitted optax SGD training step on a
  CIFAR-shaped batch of 128, as a Python-API user writes it (the cache switched on with
  ``jax.config.update("jax_compilation_cache_dir", ...)``).

Goal (issue): a warm start of ``jaxdefense demo`` spends under 5 s compiling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

CASES = ("demo", "step")


# ------------------------------------------------------------------------ child side
def _child(case: str, cache: str, min_compile_s: float) -> dict:
  import jax  # noqa: F401  (after the parent set the environment)

  from jaxdefense._compile_log import CompileLog

  log = CompileLog()
  if case == "demo":
    from jaxdefense import commands
    argv = ["demo", "--quick", "--compile_cache", cache]
    with tempfile.TemporaryDirectory() as work, log:
      rc = commands.main([*argv, "--workdir", work])
    if rc:
      raise SystemExit(f"jaxdefense demo exited with {rc}")
  else:
    import jax.numpy as jnp
    import optax

    import jaxdefense as jd
    if cache != "none":
      jax.config.update("jax_compilation_cache_dir", cache)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    with log:
      model = jd.models.create("resnet20")
      x = jnp.zeros((128, 32, 32, 3))
      y = jnp.zeros((128,), jnp.int32)
      variables = model.init(jax.random.key(0), x)
      opt = optax.sgd(0.1, momentum=0.9)
      opt_state = opt.init(variables["params"])

      @jax.jit
      def step(params, batch_stats, opt_state, x, y):
        def loss(p):
          logits, new = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                    train=True, mutable=["batch_stats"])
          return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
        (value, new), g = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), new["batch_stats"], opt_state, value

      out = step(variables["params"], variables["batch_stats"], opt_state, x, y)
      jax.block_until_ready(out)
  return log.as_dict()


# ----------------------------------------------------------------------- parent side
def _run(case: str, cache: str, min_compile_s: float) -> dict:
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(min_compile_s)
  t = time.perf_counter()
  p = subprocess.run([sys.executable, __file__, "--child", case, cache,
                      str(min_compile_s)], env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t
  if p.returncode:
    raise SystemExit(f"{case} failed ({p.returncode}):\n{p.stderr[-3000:]}")
  line = [l for l in p.stdout.splitlines() if l.startswith("COMPILE_LOG ")][-1]
  out = json.loads(line[len("COMPILE_LOG "):])
  out["process_s"] = wall
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--case", choices=CASES, action="append",
                 help="case(s) to run (default: all)")
  p.add_argument("--min-compile-s", type=float, default=None,
                 help="jax_persistent_cache_min_compile_time_secs of the 'step' case "
                      "(the demo uses the command line's own setting)")
  p.add_argument("--out", default=None, metavar="PATH", help="write the results as JSON")
  p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    case, cache, min_s = args.child
    print("COMPILE_LOG " + json.dumps(_child(case, cache, float(min_s))), flush=True)
    return 0
  import jax
  min_s = 0.0 if args.min_compile_s is None else args.min_compile_s
  results = {"machine": {"cpu": platform.processor() or platform.machine(),
                         "cpus": os.cpu_count(), "jax": jax.__version__,
                         "load_start": os.getloadavg()[0]}, "cases": {}}
  print(f"# time to a first result, {platform.machine()} {os.cpu_count()} CPUs, jax "
        f"{jax.__version__}, load {os.getloadavg()[0]:.1f}")
  head = (f"{'case':<6}{'cache':<10}{'process s':>10}{'in-run s':>10}{'compiling s':>12}"
          f"{'trace':>8}{'lower':>8}{'XLA':>8}{'load':>8}{'compiles':>9}{'hits':>6}"
          f"{'misses':>7}")
  print(head)
  print("-" * len(head))
  for case in args.case or CASES:
    with tempfile.TemporaryDirectory() as cache:
      rows = {"cold": _run(case, cache, min_s), "warm": _run(case, cache, min_s),
              "no cache": _run(case, "none", min_s)}
    results["cases"][case] = rows
    for label, r in rows.items():
      print(f"{case:<6}{label:<10}{r['process_s']:>10.1f}{r['wall_s']:>10.1f}"
            f"{r['total_s']:>12.1f}{r['trace_s']:>8.1f}{r['lower_s']:>8.1f}"
            f"{r['compile_s']:>8.1f}{r['cache_load_s']:>8.1f}{r['compiles']:>9d}"
            f"{r['cache_hits']:>6d}{r['cache_misses']:>7d}")
  if "demo" in results["cases"]:
    warm = results["cases"]["demo"]["warm"]["total_s"]
    print(f"\ngoal: warm demo compiling < 5 s: {warm:.1f} s "
          f"({'met' if warm < 5 else 'NOT met'})")
  results["machine"]["load_end"] = os.getloadavg()[0]
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
