"""Where the bound-propagation time goes: single pieces, XLA:CPU against PyTorch.

  python benchmarks/certify_pieces.py [--quick] [--variants]

A diagnostic for ``benchmarks/certify.py`` (not part of its figures).  Times, in one
process, side by side (median of rounds, JAX and PyTorch alternated):

* one convolution of each kind the zoo nets run (ResNet-Tiny's 3x3 32->32 and 1x1, and
  ConvSmall's 4x4 / stride-2 convolutions), NHWC/HWIO in XLA, NCHW/OIHW in PyTorch
  (oneDNN), at the batch sizes of a box run (1, 32, 256) and of a zonotope's stacked
  generators (``m * B``);
* the box ReLU of a hybrid zonotope on ``[m, B, ...]`` generators (``b + sum_j |E_j|``,
  the case split, the generators masked), XLA against PyTorch;
* ``HybridZonotope.affine``'s one convolution over the stacked ``[c; E]`` (a copy of the
  generators, the output sliced back) against two convolutions, on ``E`` and on ``c``;
* the dispatch cost of an empty jitted call.

The main process runs with the XLA:CPU flags ``import jaxdefense`` installs
(``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``: XLA's Eigen
convolution).  ``--variants`` reruns the convolutions in fresh processes that opt out of
them (``JAXDEFENSE_NO_XLA_FLAGS=1``) under other flags: jaxlib's default (YNNPACK
convolutions), no YNNPACK at all, and Eigen convolutions with ``--xla_cpu_use_onednn``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jaxdefense  # noqa: E402,F401  - installs the library's XLA:CPU flags (unless opted out)


def _median_pair(f_jax, f_torch, rounds):
  import jax  # pylint: disable=import-outside-toplevel
  for f in (f_jax, f_torch):
    jax.block_until_ready(f())
    jax.block_until_ready(f())
  tj, tt = [], []
  for _ in range(rounds):
    t = time.perf_counter()
    jax.block_until_ready(f_jax())
    tj.append(time.perf_counter() - t)
    t = time.perf_counter()
    f_torch()
    tt.append(time.perf_counter() - t)
  return statistics.median(tj), statistics.median(tt)


CONVS = {
    # name: (H, W, Cin, Cout, k, stride, pad)
    "tiny 3x3 32->32 (32x32)": (32, 32, 32, 32, 3, 1, 1),
    "tiny 3x3 16->16 (32x32)": (32, 32, 16, 16, 3, 1, 1),
    "tiny 1x1 16->32 (32x32)": (32, 32, 16, 32, 1, 1, 0),
    "small 4x4/2 1->16 (28x28)": (28, 28, 1, 16, 4, 2, 0),
    "small 4x4/2 16->32 (13x13)": (13, 13, 16, 32, 4, 2, 0),
}


def conv_table(batches, rounds, threads):
  import jax
  import jax.numpy as jnp
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(threads)
  rows = []
  rng = np.random.RandomState(0)
  for name, (h, w, ci, co, k, s, p) in CONVS.items():
    kern = rng.standard_normal((k, k, ci, co)).astype(np.float32)
    kj = jnp.asarray(kern)
    kt = torch.from_numpy(kern.transpose(3, 2, 0, 1).copy())
    f = jax.jit(lambda a, b, s=s, p=p: jax.lax.conv_general_dilated(
        a, b, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC")))
    for n in batches:
      x = rng.uniform(size=(n, h, w, ci)).astype(np.float32)
      xj = jnp.asarray(x)
      xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
      with torch.inference_mode():
        tj, tt = _median_pair(lambda: f(xj, kj), lambda: F.conv2d(xt, kt, None, s, p), rounds)
        diff = float(np.max(np.abs(np.asarray(f(xj, kj)).transpose(0, 3, 1, 2)
                                   - F.conv2d(xt, kt, None, s, p).numpy())))
      ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
      gflop = 2 * n * ho * wo * co * k * k * ci / 1e9
      rows.append({"conv": name, "N": n, "jax_ms": tj * 1e3, "torch_ms": tt * 1e3,
                   "jax_gflops": gflop / tj, "torch_gflops": gflop / tt,
                   "torch_over_jax_time": tt / tj, "max_abs_diff": diff})
      print(f"{name:<28} N={n:>5}: XLA {tj * 1e3:9.2f} ms ({gflop / tj:6.1f} GFLOP/s) | "
            f"PyTorch {tt * 1e3:9.2f} ms ({gflop / tt:6.1f} GFLOP/s) | JAX/torch speed "
            f"{tt / tj:5.2f}x | diff {diff:.1e}", flush=True)
  return rows


def other_pieces(rounds, threads, m, batch):
  import jax
  import jax.numpy as jnp
  import torch
  torch.set_num_threads(threads)
  rng = np.random.RandomState(0)
  shape = (batch, 13, 13, 16)   # ConvSmall after its first convolution
  c = rng.standard_normal(shape).astype(np.float32)
  b = np.abs(rng.standard_normal(shape)).astype(np.float32) * 0.01
  e = (rng.standard_normal((m,) + shape) * 0.001).astype(np.float32)
  cj, bj, ej = jnp.asarray(c), jnp.asarray(b), jnp.asarray(e)
  ct, bt, et = (torch.from_numpy(v.transpose(*range(v.ndim - 3), v.ndim - 1, v.ndim - 3,
                                             v.ndim - 2).copy()) for v in (c, b, e))

  @jax.jit
  def relu_j(c, b, e):
    r = b + jnp.sum(jnp.abs(e), axis=0)
    lo, hi = c - r, c + r
    pos = lo >= 0
    cross = (lo < 0) & (hi > 0)
    half = jnp.where(cross, hi / 2, 0.0)
    return jnp.where(pos, c, half), jnp.where(pos, b, half), e * pos.astype(e.dtype)

  def relu_t():
    r = bt + et.abs().sum(0)
    lo, hi = ct - r, ct + r
    pos = lo >= 0
    cross = (lo < 0) & (hi > 0)
    half = torch.where(cross, hi / 2, torch.zeros(()))
    return torch.where(pos, ct, half), torch.where(pos, bt, half), et * pos

  out = {}
  with torch.inference_mode():
    tj, tt = _median_pair(lambda: relu_j(cj, bj, ej), relu_t, rounds)
  out["relu"] = {"m": m, "B": batch, "jax_ms": tj * 1e3, "torch_ms": tt * 1e3}
  print(f"box ReLU on [{m}, {batch}, 13, 13, 16]: XLA {tj * 1e3:.2f} ms | PyTorch "
        f"{tt * 1e3:.2f} ms", flush=True)
  # HybridZonotope.affine: one convolution over the stacked [c; E] (a copy of E, and the
  # output sliced back into c and E), against two convolutions, on E and on c (what the
  # twin does).  ConvSmall's second convolution (4x4 / 2, 16 -> 32) on these values.
  kern = jnp.asarray(rng.standard_normal((4, 4, 16, 32)).astype(np.float32))
  conv = lambda a: jax.lax.conv_general_dilated(  # noqa: E731
      a, kern, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  @jax.jit
  def stacked(c, e):
    out = conv(jnp.concatenate([c, e.reshape((-1,) + e.shape[2:])], 0))
    n = c.shape[0]
    return out[:n], out[n:].reshape(e.shape[:2] + out.shape[1:])

  @jax.jit
  def separate(c, e):
    return conv(c), conv(e.reshape((-1,) + e.shape[2:])).reshape(e.shape[:2] + (5, 5, 32))
  ref_s, ref_p = stacked(cj, ej), separate(cj, ej)
  same = all(bool(jnp.all(a == b)) for a, b in zip(ref_s, ref_p))
  tj, tp = _median_pair(lambda: stacked(cj, ej), lambda: jax.block_until_ready(
      separate(cj, ej)), rounds)
  out["stacked_vs_separate"] = {"stacked_ms": tj * 1e3, "separate_ms": tp * 1e3,
                                "E_MiB": e.nbytes / 2**20, "bitwise_equal": same}
  print(f"affine on [{m}, {batch}, 13, 13, 16] ({e.nbytes / 2**20:.0f} MiB): XLA conv of "
        f"stacked [c; E] {tj * 1e3:.2f} ms | two convs, E and c, {tp * 1e3:.2f} ms "
        f"(bitwise equal: {same})", flush=True)
  empty = jax.jit(lambda a: a + 1)
  one = jnp.ones(())
  tj, tt = _median_pair(lambda: empty(one), lambda: torch.ones(()) + 1, max(rounds, 50))
  out["dispatch"] = {"jax_us": tj * 1e6, "torch_us": tt * 1e6}
  print(f"dispatch of a scalar op: JAX jit {tj * 1e6:.0f} us | PyTorch eager "
        f"{tt * 1e6:.0f} us", flush=True)
  return out


#: name -> XLA_FLAGS for a fresh process that opts out of jaxdefense's own flags
#: (``JAXDEFENSE_NO_XLA_FLAGS=1``).  The main process runs with the flags
#: ``import jaxdefense`` installs (``-individual_convolution``: XLA's Eigen convolution).
VARIANTS = {
    "jaxlib default (YNNPACK convolutions)": "",
    "no YNNPACK at all": "--xla_cpu_experimental_ynn_fusion_type=",
    "Eigen convolutions + oneDNN": ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
                                    " --xla_cpu_use_onednn=true"),
}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--variants", action="store_true",
                  help="rerun the convolutions under other XLA:CPU flags")
  ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                  help="PyTorch threads")
  ap.add_argument("--convs-only", action="store_true")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  rounds = 3 if args.quick else 7
  batches = [1, 32, 256] if args.quick else [1, 32, 256, 3073]
  out = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "torch_threads": args.threads}
  print(f"XLA_FLAGS={out['xla_flags']!r}, PyTorch threads {args.threads}", flush=True)
  out["convs"] = conv_table(batches, rounds, args.threads)
  if not args.convs_only:
    out["pieces"] = other_pieces(rounds, args.threads, 784 if not args.quick else 64, 8)
  if args.variants:
    out["variants"] = {}
    for name, flags in VARIANTS.items():
      env = dict(os.environ, XLA_FLAGS=flags, JAXDEFENSE_NO_XLA_FLAGS="1")
      print(f"== XLA_FLAGS={flags}", flush=True)
      path = f"/tmp/certify_pieces_{len(out['variants'])}.json"
      cmd = [sys.executable, __file__, "--convs-only", "--threads", str(args.threads),
             "--json", path] + (["--quick"] if args.quick else [])
      subprocess.run(cmd, env=env, check=True)
      with open(path) as f:
        out["variants"][name] = json.load(f)["convs"]
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
