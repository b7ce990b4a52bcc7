"""Bound-propagation throughput: jaxdefense.certify against a PyTorch twin.

  python benchmarks/certify.py [--quick] [--nets conv_small,...] [--batches 1,32,256]
                               [--domains box,...] [--xla-flags="..."] [--json PATH]

For the DiffAI zoo nets ConvSmall, ConvMed, FFNN (28x28x1) and ResNet-Tiny (32x32x3),
at batch sizes 1, 32 and 256, each network is propagated in three ways, in JAX
(``certify.make_bounds_fn``, jit-compiled) and in a PyTorch twin on copied weights
written here in plain PyTorch (auto_LiRPA does not install next to torch 2.x / NumPy 2):

* ``box``: interval bound propagation, centre / radius form (``W c + b``, ``|W| r``,
  as auto_LiRPA's IBP);
* ``zonotope``: DiffAI's hybrid zonotope as ``certify.bounds(..., "zonotope")`` runs it
  by default: one generator per input pixel (``correlate_input=True``), the box ReLU
  (``relu="box"``), the network's final ``CorrelateAll`` before the last dense layer;
* ``zonotope, box start``: the same with ``correlate_input=False`` (DiffAI's HBox start:
  the input is a box, the only generators are the final ``CorrelateAll``'s).

The twin's hybrid zonotope is ``(c, b, E)``: centre ``[B, C, H, W]``, box radius
``[B, C, H, W]`` and generators ``[m, B, C, H, W]``.  An affine layer maps ``c`` with
``W`` and the bias, every generator with ``W`` (one convolution over the ``m * B``
stacked generators) and ``b`` with ``|W|``.  The ReLU is ``HybridZonotope.relu`` with
``relu_mode="box"``: ``lo, hi = c -+ (b + sum_j |E_j|)``; a positive neuron
(``lo >= 0``) keeps ``c``, ``b`` and its generators; a crossing one (``lo < 0 < hi``)
becomes ``c = b = hi / 2`` with zero generators; a negative one becomes 0.
``CorrelateAll`` moves the box radius of every variable onto a generator of its own
(``E_new = diag(b)``, ``b = 0``).  Bounds are ``c -+ (b + sum_j |E_j|)``.

The bounds of the two agree, every row is checked (``max |JAX - twin| / (1 + max
|bound|)`` at most 1e-5, asserted), and before any timing the twin is checked against
``certify.bounds(model, variables, x, eps, domain)`` itself (``sound=False``, the
default) on every net.

Throughput is images per second, the median of timed calls after a warm-up call (JAX
functions are compiled ahead, ``jit(...).lower(...).compile()``); JAX
and PyTorch are timed in the same process, round by round (JAX, PyTorch with 1 thread,
PyTorch with every core, then again), so that a change of machine load hits all of them
alike; the faster PyTorch setting is the reference (on long rows a setting already 1.5x
slower in the warm-up is not timed again).  The ratio is JAX / reference (> 1: JAX
faster).  JAX runs twice: as ``certify.bounds`` does, the variables an argument of the
compiled function (it computes ``|W|`` on every call), and with the variables closed over
("weights folded": XLA folds ``|W|`` into constants at compile time, as the twin computes
``|W|`` once when it copies the weights; same bounds bit for bit); the folded run is left
out of rows whose calls take long (``n/a``).  GFLOP/s use XLA's cost analysis of the JAX
function for both sides.  ``--xla-flags="..."`` runs JAX under other XLA:CPU flags than
the ones ``import jaxdefense`` installs.  A zonotope whose generator tensor would exceed
``--max-gen-gib`` (default 2.5 GiB; e.g. ResNet-Tiny with 3,072 input generators at
batch 32: 12 GiB) is not run, and the table says so.  Memory: XLA's compiled temp size
(JAX) and the largest generator tensor the twin holds; a sweep over ``CorrelateMaxK(k)``
on ConvSmall's input shows memory and time of JAX as the generator count grows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable



def _early_xla_flags(argv: list[str]) -> None:
  """``--xla-flags=STR``: XLA_FLAGS for this run, set before JAX starts; the library's
  own flags (``import jaxdefense`` adds them) are then left out."""
  for arg in argv:
    if arg.startswith("--xla-flags="):   # the value starts with "--": use the = form
      os.environ["XLA_FLAGS"] = arg.split("=", 1)[1]
      os.environ["JAXDEFENSE_NO_XLA_FLAGS"] = "1"


_early_xla_flags(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jaxdefense as jd  # noqa: E402
from jaxdefense import certify  # noqa: E402
from jaxdefense.models import _diffai  # noqa: E402

try:
  import torch
  import torch.nn.functional as F
except ImportError:  # pragma: no cover
  torch = None

#: ``--nets`` names: (input shape, eps)
NETS = {
    "conv_small": ((28, 28, 1), 0.1),
    "conv_med": ((28, 28, 1), 0.1),
    "ffnn": ((28, 28, 1), 0.1),
    "resnet_tiny": ((32, 32, 3), 0.01),
}
#: domain label -> (certify domain, correlate_input)
DOMAINS = {
    "box": ("box", True),
    "zonotope": ("zonotope", True),
    "zonotope_box_start": ("zonotope", False),
}
TOLERANCE = 1e-5


# ------------------------------------------------------------------- PyTorch twin
class TorchTwin:
  """Interval and hybrid-zonotope propagation of a DiffAINet in plain PyTorch.

  Same weights as the JAX model (copied), NCHW layout; flattening goes through NHWC
  order, as the JAX model's.  Handles feed-forward nets (conv-ReLU, dense-ReLU) and
  ResNet-Tiny's wide blocks, without normalisation or abstract layers other than the
  final ``CorrelateAll``.
  """

  def __init__(self, model: _diffai.DiffAINet, params: Any):
    if model.blocks and (model.block != "wide" or model.block_convs):
      raise ValueError("TorchTwin handles feed-forward nets and ResNet-Tiny only.")
    if model.normalize is not None or model.abstract:
      raise ValueError("TorchTwin handles nets without normalisation or abstract layers.")
    self.correlate_last = model.correlate_last
    convs = iter(sorted((k for k in params if k.startswith("Conv_")), key=lambda k: int(k[5:])))
    denses = iter(sorted((k for k in params if k.startswith("Dense_")),
                         key=lambda k: int(k[6:])))

    def conv(stride, padding, p=None):
      p = params[next(convs)] if p is None else p
      w = torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy())
      b = torch.from_numpy(np.asarray(p["bias"]).copy())
      return ("conv", w, w.abs(), b, stride, padding)

    def dense():
      p = params[next(denses)]
      w = torch.from_numpy(np.asarray(p["kernel"]).T.copy())
      return ("dense", w, w.abs(), torch.from_numpy(np.asarray(p["bias"]).copy()))

    layers = []
    for _, _, stride, padding in model.convs:
      layers += [conv(stride, padding), ("relu",)]
    for i in range(len(model.blocks)):   # ResidualBlock "block{i}": 1x1 shortcut, 3x3, 3x3
      p = params[f"block{i}"]
      layers.append(("wide", conv(1, 0, p["Conv_0"]), conv(1, 1, p["Conv_1"]),
                     conv(1, 1, p["Conv_2"])))
    for _ in model.dense:
      layers += [("flatten",), dense(), ("relu",)]
    layers.append(("flatten",))
    if model.correlate_last:
      layers.append(("correlate_all",))
    layers.append(dense())
    self.layers = layers
    self.max_generator_bytes = 0

  # --------------------------------------------------------------------- box
  @staticmethod
  def _box_affine(layer, c, r):
    if layer[0] == "conv":
      _, w, wa, b, s, p = layer
      return F.conv2d(c, w, b, s, p), F.conv2d(r, wa, None, s, p)
    _, w, wa, b = layer
    return F.linear(c, w, b), F.linear(r, wa)

  @staticmethod
  def _box_relu(c, r):
    lo, hi = (c - r).clamp_min(0), (c + r).clamp_min(0)
    return (lo + hi) / 2, (hi - lo) / 2

  def ibp(self, lo, hi):
    """Interval bounds ``(lo, hi)`` of the logits for an NCHW input box."""
    c, r = (lo + hi) / 2, (hi - lo) / 2
    for layer in self.layers:
      kind = layer[0]
      if kind in ("conv", "dense"):
        c, r = self._box_affine(layer, c, r)
      elif kind == "relu":
        c, r = self._box_relu(c, r)
      elif kind == "flatten":
        if c.dim() == 4:  # flatten in NHWC order, as the JAX model
          c = c.permute(0, 2, 3, 1).flatten(1)
          r = r.permute(0, 2, 3, 1).flatten(1)
      elif kind == "wide":
        _, short, a, b = layer
        sc, sr = self._box_affine(short, c, r)
        yc, yr = self._box_relu(*self._box_affine(a, c, r))
        yc, yr = self._box_affine(b, yc, yr)
        c, r = self._box_relu(sc + yc, sr + yr)
      # "correlate_all" is the identity on boxes
    return c - r, c + r

  # ---------------------------------------------------------------- zonotope
  def _z_affine(self, layer, z):
    c, b, e = z
    if layer[0] == "conv":
      _, w, wa, bias, s, p = layer
      c2 = F.conv2d(c, w, bias, s, p)
      b2 = F.conv2d(b, wa, None, s, p)
      if e is not None:   # every generator through W: one convolution over m * B images
        m, n = e.shape[:2]
        e = F.conv2d(e.flatten(0, 1), w, None, s, p).unflatten(0, (m, n))
    else:
      _, w, wa, bias = layer
      c2, b2 = F.linear(c, w, bias), F.linear(b, wa)
      if e is not None:
        e = F.linear(e, w)
    return self._track(c2, b2, e)

  def _track(self, c, b, e):
    if e is not None:
      self.max_generator_bytes = max(self.max_generator_bytes, e.numel() * e.element_size())
    return c, b, e

  @staticmethod
  def _z_radius(z):
    c, b, e = z
    return b if e is None else b + e.abs().sum(0)

  def _z_relu(self, z):
    """``HybridZonotope.relu`` with ``relu_mode="box"`` (DiffAI's box ReLU)."""
    c, b, e = z
    r = self._z_radius(z)
    lo, hi = c - r, c + r
    pos = lo >= 0
    cross = (lo < 0) & (hi > 0)
    half = torch.where(cross, hi / 2, torch.zeros((), dtype=hi.dtype))
    c = torch.where(pos, c, half)
    b = torch.where(pos, b, half)
    if e is not None:
      # generators zeroed where the neuron is not positive; in place: every ReLU input
      # here is a fresh tensor (an affine map's or a sum's output), so nothing else holds e
      e = e.mul_(pos)
    return c, b, e

  @staticmethod
  def _z_add(z1, z2):
    (c1, b1, e1), (c2, b2, e2) = z1, z2
    if (e1 is None) != (e2 is None):
      raise ValueError("the two branches of a block carry different generators.")
    return c1 + c2, b1 + b2, None if e1 is None else e1 + e2

  def _z_correlate_all(self, z):
    """``CorrelateAll`` on a ``[B, p]`` value: ``E_new[i, n, :] = b[n, i] * e_i``."""
    c, b, e = z
    new = torch.diag_embed(b).transpose(0, 1).contiguous()        # [p, B, p]
    e = new if e is None else torch.cat([e, new], 0)
    return self._track(c, torch.zeros_like(b), e)

  def zonotope(self, lo, hi, correlate_input: bool = True):
    """Bounds ``(lo, hi)`` of the logits by the hybrid zonotope (box ReLU).

    ``correlate_input``: one generator per input pixel (as ``certify.input_set``'s
    default), else a box start (``m = 0`` until the final ``CorrelateAll``).
    """
    self.max_generator_bytes = 0
    c, r = (lo + hi) / 2, (hi - lo) / 2
    if correlate_input:
      n, p = c.shape[0], c[0].numel()
      e = torch.diag_embed(r.flatten(1)).transpose(0, 1).reshape((p,) + tuple(c.shape))
      z = self._track(c, torch.zeros_like(r), e)
    else:
      z = (c, r, None)
    for layer in self.layers:
      kind = layer[0]
      if kind in ("conv", "dense"):
        z = self._z_affine(layer, z)
      elif kind == "relu":
        z = self._z_relu(z)
      elif kind == "flatten":
        c, b, e = z
        if c.dim() == 4:  # NHWC order, as the JAX model
          z = (c.permute(0, 2, 3, 1).flatten(1), b.permute(0, 2, 3, 1).flatten(1),
               None if e is None else e.permute(0, 1, 3, 4, 2).flatten(2))
      elif kind == "wide":
        _, short, a, b = layer
        sc = self._z_affine(short, z)
        y = self._z_affine(b, self._z_relu(self._z_affine(a, z)))
        z = self._z_relu(self._z_add(sc, y))
      elif kind == "correlate_all":
        z = self._z_correlate_all(z)
    c = z[0]
    r = self._z_radius(z)
    return c - r, c + r

  def activation_sizes(self, shape: tuple[int, ...]) -> list[int]:
    """Per-example sizes of every value the network computes (input first)."""
    sizes = [int(np.prod(shape))]
    x = torch.zeros((1, shape[2], shape[0], shape[1]))
    with torch.inference_mode():
      for layer in self.layers:
        kind = layer[0]
        if kind in ("conv", "dense"):
          x = self._box_affine(layer, x, x)[0]
        elif kind == "flatten" and x.dim() == 4:
          x = x.flatten(1)
        elif kind == "wide":
          x = self._box_affine(layer[1], x, x)[0]
        sizes.append(x[0].numel())
    return sizes


def generator_bytes(sizes: list[int], batch: int, correlate_input: bool) -> int:
  """Bytes of the largest generator tensor ``[m, B, ...]`` (float32) of a run."""
  last = sizes[-2]   # the final CorrelateAll's input (before the last dense layer)
  final = (sizes[0] if correlate_input else 0) + last
  biggest = final * batch * last
  if correlate_input:
    biggest = max(biggest, sizes[0] * batch * max(sizes[:-1]))
  return 4 * biggest


def lirpa_available() -> bool:
  """Whether auto_LiRPA imports (its only PyPI release, 0.3, pins torch < 1.13 and
  imports ``numpy.lib.arraysetops``, removed in NumPy 2, so usually not)."""
  try:
    import auto_LiRPA  # noqa: F401
  except Exception:  # noqa: BLE001 - any import failure means "not available"
    return False
  return True


# ------------------------------------------------------------------------- timing
def _interleaved(entries: list[tuple[str, Callable[[], None], Callable[[], Any]]],
                 repeats: int, budget_s: float, warmups: int = 1,
                 optional: tuple[str, ...] = ()) -> dict[str, float | None]:
  """Median seconds per entry ``(name, setup, fn)``, timed round by round.

  ``warmups`` untimed calls each (JAX functions come compiled), the last one clocked;
  the number of rounds is ``repeats``, cut down (to at least 3) when the rounds would
  take more than ``budget_s``.  ``setup`` (e.g. setting PyTorch's thread count) runs
  untimed before every call.
  """
  first = {}
  for name, setup, fn in entries:
    for _ in range(warmups):
      setup()
      t = time.perf_counter()
      jax.block_until_ready(fn())
      first[name] = time.perf_counter() - t
  round_s = sum(first.values())
  rounds = (repeats if budget_s == float("inf") else
            max(3, min(repeats, int(budget_s / max(round_s, 1e-9)))))
  if round_s * rounds > budget_s:
    # Long calls: a PyTorch thread setting already 1.5x slower than the other in the
    # warm-up is not timed again (its warm-up time stands, and cannot be the reference).
    # Entries in ``optional`` are dropped (reported as None).
    torch_first = {n: v for n, v in first.items() if n.startswith("torch")}
    fastest = min(torch_first.values(), default=0.0)
    entries = [e for e in entries if e[0] not in optional and (
        e[0] not in torch_first or first[e[0]] <= 1.5 * fastest)]
  times: dict[str, list[float]] = {name: [first[name]] for name in first
                                   if name not in optional}
  for name, _, _ in entries:
    times[name] = []
  for _ in range(rounds):
    for name, setup, fn in entries:
      setup()
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  out: dict[str, float | None] = {name: statistics.median(v) for name, v in times.items()}
  return {**{name: None for name in first if name not in out}, **out}


def _time(fn: Callable[[], Any], repeats: int) -> float:
  """Median seconds of ``fn()`` (results blocked on) after two warm-up calls."""
  return _interleaved([("fn", lambda: None, fn)], repeats, float("inf"), warmups=2)["fn"]


def _rel_diff(jax_bounds, torch_bounds) -> float:
  """``max |JAX - twin| / (1 + max |JAX bound|)`` over lower and upper bounds."""
  lo_j, hi_j = (np.asarray(v) for v in jax_bounds)
  lo_t, hi_t = (v.numpy() for v in torch_bounds)
  scale = 1.0 + max(float(np.max(np.abs(lo_j))), float(np.max(np.abs(hi_j))))
  return float(max(np.max(np.abs(lo_j - lo_t)), np.max(np.abs(hi_j - hi_t)))) / scale


def _inputs(name: str, batch: int, seed: int = 0):
  shape, eps = NETS[name]
  x = np.random.RandomState(seed).uniform(size=(batch,) + shape).astype(np.float32)
  lo = np.clip(x - eps, 0, 1).transpose(0, 3, 1, 2).copy()
  hi = np.clip(x + eps, 0, 1).transpose(0, 3, 1, 2).copy()
  return x, eps, torch.from_numpy(lo), torch.from_numpy(hi)


def _setup(name: str):
  shape, _ = NETS[name]
  model = jd.models.create(name)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
  return model, variables, TorchTwin(model, variables["params"])


def _twin_fn(twin: TorchTwin, label: str, lo, hi) -> Callable[[], Any]:
  _, correlate_input = DOMAINS[label]

  def run():
    with torch.inference_mode():
      if label == "box":
        return twin.ibp(lo, hi)
      return twin.zonotope(lo, hi, correlate_input=correlate_input)
  return run


# --------------------------------------------------------------------------- runs
def check_against_bounds(names: list[str], max_gen_gib: float) -> list[dict]:
  """The twin against ``certify.bounds`` itself (default ``sound=False``), asserted."""
  rows = []
  for name in names:
    model, variables, twin = _setup(name)
    sizes = twin.activation_sizes(NETS[name][0])
    for label, (domain, correlate_input) in DOMAINS.items():
      batch = 4
      while batch > 1 and label != "box" and (
          generator_bytes(sizes, batch, correlate_input) > max_gen_gib * 2**30 / 8):
        batch //= 2
      x, eps, lo, hi = _inputs(name, batch, seed=1)
      ref = certify.bounds(model, variables, jnp.asarray(x), eps, domain,
                           correlate_input=correlate_input)
      diff = _rel_diff(ref, _twin_fn(twin, label, lo, hi)())
      rows.append({"model": name, "domain": label, "batch": batch, "max_rel_diff": diff})
      print(f"check {name:<12} {label:<19} batch {batch}: twin vs certify.bounds "
            f"{diff:.1e}", flush=True)
      assert diff <= TOLERANCE, (name, label, diff)
  return rows


def measure(name: str, label: str, batch: int, repeats: int, budget_s: float,
            max_gen_gib: float, cache: dict) -> dict:
  """One row: JAX and the twin, side by side, on ``name`` at ``batch``."""
  if name not in cache:
    cache.clear()   # one net's weights at a time
    cache[name] = _setup(name)
  model, variables, twin = cache[name]
  domain, correlate_input = DOMAINS[label]
  sizes = twin.activation_sizes(NETS[name][0])
  row: dict[str, Any] = {"model": name, "domain": label, "batch": batch}
  if label != "box":
    gen = generator_bytes(sizes, batch, correlate_input)
    row["input_generators"] = sizes[0] if correlate_input else 0
    row["largest_generator_MiB"] = gen / 2**20
    if gen > max_gen_gib * 2**30:
      row["skipped"] = (f"not run: generator tensor {gen / 2**30:.1f} GiB "
                        f"(> {max_gen_gib:g} GiB)")
      return row
  x, eps, lo, hi = _inputs(name, batch)
  xj, ej = jnp.asarray(x), jnp.asarray(eps, jnp.float32)
  fn = jax.jit(certify.make_bounds_fn(model, domain, correlate_input=correlate_input))
  compiled = fn.lower(variables, xj, ej).compile()
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
  row["xla_temp_MiB"] = None if temp is None else temp / 2**20
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", float("nan")))
  row["xla_gflop"] = flops / 1e9
  twin_fn = _twin_fn(twin, label, lo, hi)
  threads = sorted({1, os.cpu_count() or 1})
  default_threads = torch.get_num_threads()

  def set_threads(t):
    return lambda: torch.set_num_threads(t)
  # The same function with the weights closed over: XLA then folds |W| (and anything
  # else that depends on the weights only) into constants at compile time, as the twin
  # computes |W| once when it copies the weights.  Same arithmetic per call.
  raw = certify.make_bounds_fn(model, domain, correlate_input=correlate_input)
  folded = jax.jit(lambda a, e: raw(variables, a, e)).lower(xj, ej).compile()
  entries = [("jax", lambda: None, lambda: compiled(variables, xj, ej)),
             ("jax_folded", lambda: None, lambda: folded(xj, ej))]
  entries += [(f"torch{t}", set_threads(t), twin_fn) for t in threads]
  secs = _interleaved(entries, repeats, budget_s, optional=("jax_folded",))
  torch.set_num_threads(default_threads)
  twin_bounds = twin_fn()
  diff = _rel_diff(compiled(variables, xj, ej), twin_bounds)
  diff_folded = _rel_diff(folded(xj, ej), twin_bounds)
  best = min(threads, key=lambda t: secs[f"torch{t}"])
  row.update({
      "jax_img_per_s": batch / secs["jax"],
      "jax_folded_img_per_s": None if secs["jax_folded"] is None else
                              batch / secs["jax_folded"],
      "twin_img_per_s_by_threads": {t: batch / secs[f"torch{t}"] for t in threads},
      "rounds_note": "a thread setting 1.5x slower in the warm-up of a long row is timed once",
      "twin_threads": best,
      "twin_img_per_s": batch / secs[f"torch{best}"],
      "ratio_jax_over_twin": secs[f"torch{best}"] / secs["jax"],
      "ratio_jax_folded_over_twin": None if secs["jax_folded"] is None else
                                    secs[f"torch{best}"] / secs["jax_folded"],
      "jax_gflop_per_s": flops / 1e9 / secs["jax"],
      "twin_gflop_per_s": flops / 1e9 / secs[f"torch{best}"],
      "max_rel_diff": max(diff, diff_folded),
  })
  if label != "box":
    row["twin_largest_generator_MiB"] = twin.max_generator_bytes / 2**20
  assert row["max_rel_diff"] <= TOLERANCE, (name, label, batch, diff, diff_folded)
  return row


def generator_sweep(batch: int, eps: float, repeats: int, ks: list[int]) -> list[dict]:
  """ConvSmall with CorrelateMaxK(k) on its input (JAX): generators vs memory, time."""
  rows = []
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.uniform(size=(batch, 28, 28, 1)), jnp.float32)
  e = jnp.asarray(eps, jnp.float32)
  for k in ks:
    model = jd.models.create("conv_small",
                             abstract=(("input", _diffai.Abstract.of("correlate_max_k", k=k)),))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
    fn = jax.jit(certify.make_bounds_fn(model, "zonotope", correlate_input=False))
    compiled = fn.lower(variables, x, e).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    s = _time(lambda: compiled(variables, x, e), repeats)
    lo, hi = compiled(variables, x, e)
    rows.append({"input_generators": k, "batch": batch, "img_per_s": batch / s,
                 "xla_temp_MiB": None if temp is None else temp / 2**20,
                 "mean_width": float(jnp.mean(hi - lo))})
  return rows


def _cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
  except OSError:
    return "unknown"
  for line in out.splitlines():
    if line.startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return "unknown"


def _matmul_peak() -> dict[str, float]:
  """GFLOP/s of a 2048^3 float32 matrix product, JAX and PyTorch (every core)."""
  n = 2048
  a = np.random.RandomState(0).standard_normal((n, n)).astype(np.float32)
  aj, at = jnp.asarray(a), torch.from_numpy(a)
  mm = jax.jit(jnp.dot)
  secs = _interleaved([("jax", lambda: None, lambda: mm(aj, aj)),
                       ("torch", lambda: None, lambda: torch.mm(at, at))], 5, float("inf"))
  return {k: 2 * n**3 / 1e9 / v for k, v in secs.items()}


def _fmt(v: float) -> str:
  return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}" if v >= 1 else f"{v:.2f}"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="batches 1 and 8, few repeats")
  ap.add_argument("--nets", default=",".join(NETS), help="comma-separated zoo names")
  ap.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated domains")
  ap.add_argument("--batches", default=None, help="comma-separated batch sizes")
  ap.add_argument("--max-gen-gib", type=float, default=2.5,
                  help="skip zonotopes whose generator tensor exceeds this (GiB)")
  ap.add_argument("--no-sweep", action="store_true", help="skip the generator sweep")
  ap.add_argument("--no-checks", action="store_true",
                  help="skip the check against certify.bounds (every row is still checked "
                       "against the twin)")
  ap.add_argument("--xla-flags", default=None,
                  help="XLA_FLAGS for this run instead of the library's own flags "
                       "(write --xla-flags=\"--xla_cpu_...\")")
  ap.add_argument("--json", default=None, help="also write the results to this file")
  args = ap.parse_args()
  if torch is None:
    raise SystemExit("benchmarks/certify.py needs PyTorch for its reference twin.")
  repeats = 3 if args.quick else 5
  budget_s = 10.0 if args.quick else 30.0
  batches = ([int(b) for b in args.batches.split(",")] if args.batches
             else [1, 8] if args.quick else [1, 32, 256])
  names = [n for n in args.nets.split(",") if n]
  labels = [d for d in args.domains.split(",") if d]
  for n in names:
    if n not in NETS:
      raise SystemExit(f"unknown net {n!r}; choose from {list(NETS)}")
  for d in labels:
    if d not in DOMAINS:
      raise SystemExit(f"unknown domain {d!r}; choose from {list(DOMAINS)}")
  out: dict[str, Any] = {"machine": {
      "cpu": _cpu_model(), "cpus": os.cpu_count(), "jax": jax.__version__,
      "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "load_before": os.getloadavg(), "auto_lirpa_importable": lirpa_available(),
      "xla_flags": os.environ.get("XLA_FLAGS", "")}}
  print(f"{out['machine']['cpu']}, {os.cpu_count()} CPUs, jax {jax.__version__}, torch "
        f"{torch.__version__}, load {os.getloadavg()[0]:.2f}, XLA_FLAGS="
        f"{out['machine']['xla_flags']!r}", flush=True)
  out["machine"]["matmul_gflop_per_s"] = _matmul_peak()
  print(f"matmul 2048^3 GFLOP/s: {out['machine']['matmul_gflop_per_s']}", flush=True)
  out["checks"] = [] if args.no_checks else check_against_bounds(names, args.max_gen_gib)
  rows, cache = [], {}
  for name in names:
    for label in labels:
      for batch in batches:
        row = measure(name, label, batch, repeats, budget_s, args.max_gen_gib, cache)
        row["load"] = os.getloadavg()[0]
        rows.append(row)
        if "skipped" in row:
          print(f"{label:<19} {name:<12} batch {batch:>4}: {row['skipped']}", flush=True)
          continue
        mem = f" | GFLOP/s {row['jax_gflop_per_s']:.1f} / {row['twin_gflop_per_s']:.1f}"
        if label != "box":
          mem += (f" | gens {row['twin_largest_generator_MiB']:.1f} MiB, XLA temp "
                  f"{row['xla_temp_MiB']:.1f} MiB")
        folded = row["jax_folded_img_per_s"]
        folded = ("n/a" if folded is None else
                  f"{_fmt(folded)}, {row['ratio_jax_folded_over_twin']:.2f}x")
        print(f"{label:<19} {name:<12} batch {batch:>4}: JAX {_fmt(row['jax_img_per_s']):>8} "
              f"img/s | twin {_fmt(row['twin_img_per_s']):>8} img/s "
              f"({row['twin_threads']} thr) | ratio {row['ratio_jax_over_twin']:.2f}x | JAX "
              f"folded {folded} | "
              f"diff {row['max_rel_diff']:.1e}{mem} | load {row['load']:.1f}", flush=True)
  out["rows"] = rows
  if not args.no_sweep:
    out["generators"] = generator_sweep(8 if args.quick else 32, 0.1, 3,
                                        [0, 16, 64, 256] if args.quick else
                                        [0, 16, 64, 256, 784])
    for row in out["generators"]:
      mem = row["xla_temp_MiB"]
      print(f"gens k={row['input_generators']:>4}: {row['img_per_s']:8.1f} img/s, XLA temp "
            f"{'n/a' if mem is None else f'{mem:8.1f} MiB'}, mean width "
            f"{row['mean_width']:.3f}", flush=True)
  out["machine"]["load_after"] = os.getloadavg()
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
