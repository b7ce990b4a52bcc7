"""Bound-propagation throughput: jaxdefense.certify against a PyTorch reference.

  python benchmarks/certify.py [--quick] [--json PATH]

For ConvSmall (28x28x1) and ResNet-Tiny (32x32x3) of the DiffAI zoo:

* interval bound propagation (IBP, the ``Box`` domain) in JAX, jit-compiled, against the
  same network in PyTorch (weights copied) propagated by a plain PyTorch interval
  propagation written here (centre / radius form: ``W c + b``, ``|W| r``, as
  auto_LiRPA's IBP; auto_LiRPA itself does not install next to torch 2.x / NumPy 2);
  the box bounds of both are compared numerically;
* the hybrid zonotope in JAX (DiffAI's start: a box input, correlated by the network's
  final CorrelateAll; and, for ConvSmall, every input pixel correlated), for which no
  reference is run;
* memory and time of the hybrid zonotope as the number of generators grows
  (``CorrelateMaxK(k)`` on the input of ConvSmall): XLA's compiled memory analysis.

Throughput is images per second (median of several timed calls after warm-up), the
ratio is JAX / reference (> 1: JAX faster).  JAX uses XLA's default CPU thread pool;
PyTorch is timed with 1 thread and with every core, and the faster is the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jaxdefense as jd  # noqa: E402
from jaxdefense import certify  # noqa: E402
from jaxdefense import nn as L  # noqa: E402
from jaxdefense.models import _diffai  # noqa: E402

try:
  import torch
  import torch.nn.functional as F
except ImportError:  # pragma: no cover
  torch = None


def _time(fn: Callable[[], Any], repeats: int) -> float:
  """Median seconds of ``fn()`` (results blocked on) after two warm-up calls."""
  for _ in range(2):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


# ------------------------------------------------------------------- PyTorch side
def torch_ibp_model(model: _diffai.DiffAINet, params: Any) -> Callable:
  """A PyTorch interval propagation of a DiffAINet with the same weights.

  Returns ``ibp(lo, hi) -> (lo, hi)`` on NCHW tensors.  Normalisation is folded into
  the input box (the same affine map), the abstract layers are the identity on boxes.
  """
  layers = []
  convs = iter(sorted((k for k in params if k.startswith("Conv_")), key=lambda k: int(k[5:])))
  denses = iter(sorted((k for k in params if k.startswith("Dense_")), key=lambda k: int(k[6:])))

  def conv(stride, padding, p=None):
    p = params[next(convs)] if p is None else p
    w = torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy())
    b = torch.from_numpy(np.asarray(p["bias"]).copy())
    return ("conv", w, w.abs(), b, stride, padding)

  def dense():
    p = params[next(denses)]
    w = torch.from_numpy(np.asarray(p["kernel"]).T.copy())
    return ("dense", w, w.abs(), torch.from_numpy(np.asarray(p["bias"]).copy()))

  if model.blocks and (model.block != "wide" or model.block_convs):
    raise ValueError("torch_ibp_model handles feed-forward nets and ResNet-Tiny only.")
  for _, _, stride, padding in model.convs:
    layers.append(conv(stride, padding))
    layers.append(("relu",))
  for i in range(len(model.blocks)):   # ResidualBlock "block{i}": 1x1 shortcut, 3x3, 3x3
    p = params[f"block{i}"]
    layers.append(("wide", conv(1, 0, p["Conv_0"]), conv(1, 1, p["Conv_1"]),
                   conv(1, 1, p["Conv_2"])))
  for _ in model.dense:
    layers.append(("flatten",))
    layers.append(dense())
    layers.append(("relu",))
  layers.append(("flatten",))
  layers.append(dense())

  def affine(layer, c, r):
    if layer[0] == "conv":
      _, w, wa, b, s, p = layer
      return F.conv2d(c, w, b, s, p), F.conv2d(r, wa, None, s, p)
    _, w, wa, b = layer
    return F.linear(c, w, b), F.linear(r, wa)

  def relu(c, r):
    lo, hi = (c - r).clamp_min(0), (c + r).clamp_min(0)
    return (lo + hi) / 2, (hi - lo) / 2

  def ibp(lo, hi):
    c, r = (lo + hi) / 2, (hi - lo) / 2
    for layer in layers:
      kind = layer[0]
      if kind in ("conv", "dense"):
        c, r = affine(layer, c, r)
      elif kind == "relu":
        c, r = relu(c, r)
      elif kind == "flatten":
        if c.dim() == 4:  # flatten in NHWC order, as the JAX model
          c = c.permute(0, 2, 3, 1).flatten(1)
          r = r.permute(0, 2, 3, 1).flatten(1)
      elif kind == "wide":
        _, short, a, b = layer
        sc, sr = affine(short, c, r)
        yc, yr = relu(*affine(a, c, r))
        yc, yr = affine(b, yc, yr)
        c, r = relu(sc + yc, sr + yr)
    return c - r, c + r
  return ibp


def lirpa_available() -> bool:
  """Whether auto_LiRPA imports (its only PyPI release, 0.3, pins torch < 1.13 and
  imports ``numpy.lib.arraysetops``, removed in NumPy 2, so usually not)."""
  try:
    import auto_LiRPA  # noqa: F401
  except Exception:  # noqa: BLE001 - any import failure means "not available"
    return False
  return True


# --------------------------------------------------------------------------- runs
def box_vs_reference(name: str, shape: tuple[int, ...], batch: int, eps: float,
                     repeats: int) -> dict:
  model = jd.models.create(name)
  rng = np.random.RandomState(0)
  x = rng.uniform(size=(batch,) + shape).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
  fn = jax.jit(certify.make_bounds_fn(model, "box"))
  xj = jnp.asarray(x)
  jax_s = _time(lambda: fn(variables, xj, eps), repeats)
  lo_j, hi_j = fn(variables, xj, eps)
  out = {"model": name, "input": list(shape), "batch": batch, "jax_box_img_per_s": batch / jax_s}
  if torch is None:
    out["reference"] = "none (torch not installed)"
    return out
  # auto_LiRPA's IBP is the same centre/radius computation; when it is importable the
  # report says so, but the timed reference stays this plain propagation.
  ref = "plain PyTorch IBP" + (" (auto_LiRPA importable)" if lirpa_available() else "")
  ibp = torch_ibp_model(model, variables["params"])
  lo_in = np.clip(x - eps, 0, 1).transpose(0, 3, 1, 2).copy()
  hi_in = np.clip(x + eps, 0, 1).transpose(0, 3, 1, 2).copy()
  lo_t, hi_t = torch.from_numpy(lo_in), torch.from_numpy(hi_in)
  # PyTorch's OpenMP threads can be far slower than one thread on a small, busy machine:
  # time every thread count and keep the best as the reference.
  per_threads = {}
  default_threads = torch.get_num_threads()
  with torch.inference_mode():
    for threads in sorted({1, os.cpu_count() or 1}):
      torch.set_num_threads(threads)
      per_threads[threads] = _time(lambda: ibp(lo_t, hi_t), repeats)
    lo_r, hi_r = ibp(lo_t, hi_t)
  torch.set_num_threads(default_threads)
  best_threads = min(per_threads, key=per_threads.get)
  torch_s = per_threads[best_threads]
  scale = 1.0 + float(np.max(np.abs(np.asarray(hi_j))))
  out.update({
      "reference": ref,
      "torch_threads": best_threads,
      "reference_img_per_s_by_threads": {t: batch / v for t, v in per_threads.items()},
      "reference_img_per_s": batch / torch_s,
      "ratio_jax_over_reference": torch_s / jax_s,
      "max_bound_diff_relative": float(max(np.max(np.abs(np.asarray(lo_j) - lo_r.numpy())),
                                           np.max(np.abs(np.asarray(hi_j) - hi_r.numpy()))))
                                 / scale,
  })
  return out


def zonotope_throughput(name: str, shape: tuple[int, ...], batch: int, eps: float,
                        repeats: int, correlate_input: bool, relu: str = "box") -> dict:
  model = jd.models.create(name)
  x = jnp.asarray(np.random.RandomState(0).uniform(size=(batch,) + shape), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
  fn = jax.jit(certify.make_bounds_fn(model, "zonotope", relu=relu,
                                      correlate_input=correlate_input))
  s = _time(lambda: fn(variables, x, eps), repeats)
  return {"model": name, "input": list(shape), "batch": batch, "relu": relu,
          "correlate_input": correlate_input, "jax_zonotope_img_per_s": batch / s}


def generator_sweep(batch: int, eps: float, repeats: int, ks: list[int]) -> list[dict]:
  """ConvSmall with CorrelateMaxK(k) on its input: generators vs memory and time."""
  rows = []
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.uniform(size=(batch, 28, 28, 1)), jnp.float32)
  for k in ks:
    model = jd.models.create("conv_small",
                             abstract=(("input", _diffai.Abstract.of("correlate_max_k", k=k)),))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
    fn = jax.jit(certify.make_bounds_fn(model, "zonotope", correlate_input=False))
    compiled = fn.lower(variables, x, eps).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    s = _time(lambda: fn(variables, x, eps), repeats)
    lo, hi = fn(variables, x, eps)
    rows.append({"input_generators": k, "batch": batch, "img_per_s": batch / s,
                 "xla_temp_MiB": None if temp is None else temp / 2**20,
                 "mean_width": float(jnp.mean(hi - lo))})
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="small batches, few repeats")
  ap.add_argument("--json", default=None, help="also write the results to this file")
  args = ap.parse_args()
  repeats = 3 if args.quick else 7
  eps = 0.1
  out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "jax": jax.__version__,
                                     "torch": None if torch is None else torch.__version__}}
  out["box"] = [
      box_vs_reference("conv_small", (28, 28, 1), 16 if args.quick else 256, eps, repeats),
      box_vs_reference("resnet_tiny", (32, 32, 3), 4 if args.quick else 32, eps / 10, repeats),
  ]
  out["zonotope"] = [
      zonotope_throughput("conv_small", (28, 28, 1), 16 if args.quick else 256, eps, repeats,
                          correlate_input=False),
      zonotope_throughput("conv_small", (28, 28, 1), 4 if args.quick else 16, eps, repeats,
                          correlate_input=True),
      zonotope_throughput("resnet_tiny", (32, 32, 3), 4 if args.quick else 32, eps / 10,
                          repeats, correlate_input=False),
      zonotope_throughput("resnet_tiny_few_combo", (32, 32, 3), 4 if args.quick else 32,
                          eps / 10, repeats, correlate_input=False),
  ]
  out["generators"] = generator_sweep(8 if args.quick else 32, eps, repeats,
                                      [0, 16, 64, 256] if args.quick else
                                      [0, 16, 64, 256, 784])
  for row in out["box"]:
    print(f"box  {row['model']:<12} batch {row['batch']:>4}: JAX {row['jax_box_img_per_s']:9.1f} "
          f"img/s | {row.get('reference')}: {row.get('reference_img_per_s', float('nan')):9.1f} "
          f"img/s ({row.get('torch_threads')} thr) | ratio "
          f"{row.get('ratio_jax_over_reference', float('nan')):.2f}x | "
          f"bound diff {row.get('max_bound_diff_relative', float('nan')):.1e}")
  for row in out["zonotope"]:
    print(f"zono {row['model']:<22} batch {row['batch']:>4} correlate_input="
          f"{row['correlate_input']!s:<5}: {row['jax_zonotope_img_per_s']:9.1f} img/s")
  for row in out["generators"]:
    mem = row["xla_temp_MiB"]
    print(f"gens k={row['input_generators']:>4}: {row['img_per_s']:8.1f} img/s, XLA temp "
          f"{'n/a' if mem is None else f'{mem:8.1f} MiB'}, mean width {row['mean_width']:.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
