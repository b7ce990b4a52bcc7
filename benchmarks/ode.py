"""Skew-symmetric convolutional ODE block: jaxdefense against torchdiffeq, side by side.

Run from the repository root::

  python benchmarks/ode.py                       # batch 64, 16 channels, 5 repeats
  python benchmarks/ode.py --quick               # smoke run (1-3 minutes)
  python benchmarks/ode.py --batch 128 --out ode.json --repeats 7
  python benchmarks/ode.py --pin-core 1          # one core for both: CPU efficiency
  python benchmarks/ode.py --torch-one-conv      # also torch with one convolution

What is solved.  ``dx/dt = tanh(K x - K^T x - gamma x + b)`` on ``[0, T]``, ``T = 1``,
``gamma = 0.1``, a 3x3 same-channel kernel ``K`` (LeCun-normal, as initialised by the
library) and its adjoint ``K^T``, on one CIFAR-shaped state after a ResNet stem
(default 64 x 32 x 32 x 16, ``relu`` of a standard normal), integrated as one state
(the whole batch shares its steps, as in both libraries):

* ours: ``jaxdefense.dynamics.ODEBlock(jaxdefense.nn.SkewSymmetricConv(...))``, which
  applies ``K - K^T`` as one convolution with the kernel ``skew_kernel(K)``; one
  ``jax.jit`` per timed function, compiled ahead (``.lower().compile()``), compile time
  reported apart.  Dopri5 (``PIDController(rtol, atol)``, first step ``T / 10``: the
  block's default ``n_steps``) and fixed-step classical RK4 (``n_steps=4``).
* reference: ``torchdiffeq.odeint`` on a ``torch.nn.Module`` field holding the same
  weights (the HWIO kernel copied to OIHW), written as a torchdiffeq user writes it:
  ``F.conv2d(x, K) - F.conv_transpose2d(x, K)`` (two convolutions per evaluation; the
  transposed convolution with the same weight is the adjoint).  ``--torch-one-conv``
  also times the torch field with the one-convolution skew kernel, the form ours uses,
  as a third column.  ``method='dopri5', rtol, atol`` (its own first-step selection)
  and ``method='rk4', options=dict(step_size=T / 4)``.  Note: torchdiffeq's ``'rk4'``
  is the 3/8-rule variant of RK4 (``rk4_alt_step_func``), ours the classical one; both
  take 4 evaluations per step and are of order 4, so their results differ at the
  truncation-error level.  The agreement check therefore also runs a classical RK4
  written in torch (untimed), which must agree with ours to float rounding.

Timed cases (throughput = batch / seconds per call; forward = the solve alone, torch
under ``no_grad``; fwd+bwd = value and gradient of ``sum(x(T)^2)`` with respect to the
input and the field's parameters):

* dopri5 and rk4, forward; dopri5 and rk4, fwd+bwd discretise-then-optimise (ours:
  ``adjoint="recursive"``, torch: backpropagation through ``odeint``);
* rk4 fwd+bwd with ours ``adjoint="unrolled"`` (straight-line steps, every stage stored,
  the plain convolution rule) against the same torch backpropagation;
* dopri5 fwd+bwd with the continuous adjoint (ours ``adjoint="backsolve"``, torch
  ``odeint_adjoint``; off with ``--no-adjoint``).

The frameworks alternate within each repeat (the order flips every repeat), so they see
the same machine load; each repeat gives images/s for both and one ratio ours/torch.
Medians with [min, max] over repeats are printed; one measurement runs a call as many
times as fit in about ``--target-s`` seconds (counted in the warm-up).  Process CPU time
is recorded as well (see ``benchmarks/train_step.py`` on the two clocks).

Function evaluations (NFE).  Torch: a counter in the field's ``forward`` (for
``odeint_adjoint`` also the evaluations of the augmented backward solve).  Ours:
``ode_stats`` sown by ``ODEBlock`` (``nfe``; ``nfe_backward`` = the vector-Jacobian
products of a discretise-then-optimise gradient), plus a count of the field's primal
evaluations actually executed in one gradient computation (a ``jax.debug.callback`` in
an untimed copy of the field), which includes what recursive checkpointing recomputes
and the backward solve of ``backsolve``.

Agreement.  Before timing: the field itself; the outputs and gradients of each pair; each
solution's error against a float64 torchdiffeq dopri5 solve at rtol = atol = 1e-9.

Goal (issue): ours at least 1.5x torchdiffeq's throughput on CPU at equal or fewer
function evaluations.  The script states per case whether it is met.

XLA flags.  ``import jaxdefense`` installs the recommended XLA:CPU flags before JAX
starts, as in any plain script; ``--xla-flags none`` sets ``JAXDEFENSE_NO_XLA_FLAGS=1``.
Nothing here is imported by the library; the numbers go into BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def _parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="batch 8, 2 repeats, short measurements (smoke run)")
  p.add_argument("--batch", type=int, default=None, help="batch size (default 64)")
  p.add_argument("--channels", type=int, default=16, help="channels of the state (16)")
  p.add_argument("--size", type=int, default=32, help="height = width of the state (32)")
  p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
  p.add_argument("--target-s", type=float, default=None,
                 help="seconds per measurement, rounded to whole calls (default 1.0)")
  p.add_argument("--rtol", type=float, default=1e-3, help="dopri5 rtol (1e-3)")
  p.add_argument("--atol", type=float, default=1e-3, help="dopri5 atol (1e-3)")
  p.add_argument("--rk4-steps", type=int, default=4, help="fixed RK4 steps on [0, 1] (4)")
  p.add_argument("--dopri5-n-steps", type=int, default=10,
                 help="ours: ODEBlock n_steps, first dopri5 step T / n (default 10, the "
                      "block's default)")
  p.add_argument("--gamma", type=float, default=0.1, help="damping gamma (0.1)")
  p.add_argument("--no-adjoint", action="store_true",
                 help="skip the continuous-adjoint case (backsolve vs odeint_adjoint)")
  p.add_argument("--torch-one-conv", action="store_true",
                 help="also time torch with the one-convolution skew kernel")
  p.add_argument("--out", default=None, metavar="PATH", help="write the results as JSON")
  p.add_argument("--xla-flags", choices=("recommended", "none"), default="recommended",
                 help="recommended (default): what `import jaxdefense` installs; none: "
                      "JAXDEFENSE_NO_XLA_FLAGS=1, XLA_FLAGS as given")
  p.add_argument("--pin-core", type=int, default=None, metavar="CPU",
                 help="run on this one CPU only (both frameworks single-threaded)")
  args = p.parse_args(argv)
  if args.batch is None:
    args.batch = 8 if args.quick else 64
  if args.repeats is None:
    args.repeats = 2 if args.quick else 5
  if args.target_s is None:
    args.target_s = 0.2 if args.quick else 1.0
  if min(args.batch, args.channels, args.size, args.repeats, args.rk4_steps,
         args.dopri5_n_steps) < 1:
    p.error("--batch, --channels, --size, --repeats, --rk4-steps, --dopri5-n-steps "
            "must be >= 1")
  return args


# ------------------------------------------------------------------ PyTorch side
def _torch_field(torch, kernel_hwio, bias, gamma, one_conv=False):
  """The same field in PyTorch (NCHW), counting its evaluations in ``self.nfe``."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  nn, F = torch.nn, torch.nn.functional
  pad = kernel_hwio.shape[0] // 2

  class SkewConvField(nn.Module):
    """dx/dt = tanh(K x - K^T x - gamma x + b)."""

    def __init__(self):
      super().__init__()
      oihw = np.ascontiguousarray(np.transpose(np.asarray(kernel_hwio), (3, 2, 0, 1)))
      self.weight = nn.Parameter(torch.from_numpy(oihw.astype(np.float32)))
      self.bias = nn.Parameter(torch.from_numpy(np.array(bias, dtype=np.float32)))
      self.gamma, self.one_conv, self.nfe = gamma, one_conv, 0

    def forward(self, t, x):  # pylint: disable=unused-argument
      self.nfe += 1
      w = self.weight
      if self.one_conv:  # K - K^T as one kernel: K - flip(K) with in/out swapped
        y = F.conv2d(x, w - w.flip(2, 3).transpose(0, 1), padding=pad)
      else:  # literal: K x - K^T x, K^T the adjoint (transposed conv, same weight)
        y = F.conv2d(x, w, padding=pad) - F.conv_transpose2d(x, w, padding=pad)
      return torch.tanh(y - self.gamma * x + self.bias.view(1, -1, 1, 1))

  return SkewConvField()


def _torch_classic_rk4(torch, f, x0, n):
  """Classical RK4 (ours), written out in torch: for the agreement check only."""
  h, x = 1.0 / n, x0
  for i in range(n):
    t = torch.tensor(i * h)
    k1 = f(t, x)
    k2 = f(t + h / 2, x + h / 2 * k1)
    k3 = f(t + h / 2, x + h / 2 * k2)
    k4 = f(t + h, x + h * k3)
    x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
  return x


# --------------------------------------------------------------------- helpers
def _stats(values):
  return {"median": statistics.median(values), "min": min(values), "max": max(values),
          "values": list(values)}


def _fmt(s, digits=1):
  return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def _timed(fn, n):
  w, c = time.perf_counter(), time.process_time()
  for _ in range(n):
    fn()
  return (time.perf_counter() - w) / n, (time.process_time() - c) / n


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main(argv=None) -> int:
  args = _parse(argv)
  if args.pin_core is not None:
    os.sched_setaffinity(0, {args.pin_core})  # before JAX and PyTorch size their pools
  if args.xla_flags == "none":
    os.environ["JAXDEFENSE_NO_XLA_FLAGS"] = "1"
  import jaxdefense  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  # pylint: disable=import-outside-toplevel
  import diffrax
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import torchdiffeq
  from jaxdefense.dynamics import ODE_STATS, ODEBlock, solve_ode
  from jaxdefense.nn import SkewSymmetricConv
  # pylint: enable=import-outside-toplevel

  t_start = time.perf_counter()
  ncpu = len(os.sched_getaffinity(0))
  torch.set_num_threads(ncpu)  # XLA's intra-op pool has one thread per schedulable CPU
  B, C, S, T = args.batch, args.channels, args.size, 1.0
  rng = np.random.default_rng(0)
  x_np = np.maximum(rng.standard_normal((B, S, S, C)), 0.0).astype(np.float32)
  x = jnp.asarray(x_np)
  xt = torch.from_numpy(np.ascontiguousarray(np.transpose(x_np, (0, 3, 1, 2))))
  nchw = lambda a: np.transpose(np.asarray(a), (0, 3, 1, 2))
  hwio = lambda w: np.transpose(np.asarray(w), (2, 3, 1, 0))

  # ---- ours
  field = SkewSymmetricConv(gamma=args.gamma, act="tanh")
  blocks = {
      "dopri5": ODEBlock(field=field, t1=T, solver="dopri5", rtol=args.rtol,
                         atol=args.atol, n_steps=args.dopri5_n_steps, time_dependent=False),
      "rk4": ODEBlock(field=field, t1=T, solver="rk4", n_steps=args.rk4_steps,
                      time_dependent=False),
      "rk4_unrolled": ODEBlock(field=field, t1=T, solver="rk4", n_steps=args.rk4_steps,
                               adjoint="unrolled", time_dependent=False),
      "dopri5_backsolve": ODEBlock(field=field, t1=T, solver="dopri5", rtol=args.rtol,
                                   atol=args.atol, n_steps=args.dopri5_n_steps,
                                   adjoint="backsolve", time_dependent=False),
  }
  variables = blocks["dopri5"].init(jax.random.PRNGKey(0), x)
  kernel = np.asarray(variables["params"]["field"]["kernel"])
  bias = np.asarray(variables["params"]["field"]["bias"])

  def make_fwd(block):
    return lambda v, x: block.apply(v, x)

  def make_grad(block):
    def loss(v, x):
      return jnp.sum(block.apply(v, x) ** 2)
    return jax.value_and_grad(loss, argnums=(0, 1))

  compile_s, compiled = {}, {}

  def compile_fn(name, fn):
    t0 = time.perf_counter()
    compiled[name] = jax.jit(fn).lower(variables, x).compile()
    compile_s[name] = time.perf_counter() - t0
    return compiled[name]

  compile_fn("dopri5_fwd", make_fwd(blocks["dopri5"]))
  compile_fn("dopri5_grad", make_grad(blocks["dopri5"]))
  compile_fn("rk4_fwd", make_fwd(blocks["rk4"]))
  compile_fn("rk4_grad", make_grad(blocks["rk4"]))
  compile_fn("rk4_unrolled_grad", make_grad(blocks["rk4_unrolled"]))
  if not args.no_adjoint:
    compile_fn("dopri5_backsolve_grad", make_grad(blocks["dopri5_backsolve"]))

  def ours_stats(block):
    _, st = jax.jit(lambda v, x: block.apply(v, x, mutable=[ODE_STATS]))(variables, x)
    return {k: int(v[0]) for k, v in st[ODE_STATS].items()}

  nfe_ours = {"dopri5": ours_stats(blocks["dopri5"]), "rk4": ours_stats(blocks["rk4"]),
              "rk4_unrolled": ours_stats(blocks["rk4_unrolled"])}

  def executed_evaluations(solver, adjoint, n_steps):
    """Field evaluations one gradient computation executes (forward + backward)."""
    count = [0]

    def bump():
      count[0] += 1

    def vf(t, y, params):  # pylint: disable=unused-argument
      jax.debug.callback(bump)
      return field.apply({"params": params}, y)

    def loss(p, x):
      return jnp.sum(solve_ode(vf, x, p, t1=T, solver=solver, n_steps=n_steps,
                               rtol=args.rtol, atol=args.atol, adjoint=adjoint) ** 2)
    g = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(g(variables["params"]["field"], x))  # compiles; counts once
    count[0] = 0
    jax.block_until_ready(g(variables["params"]["field"], x))
    return count[0]

  executed = {
      "dopri5_grad": executed_evaluations("dopri5", "recursive", args.dopri5_n_steps),
      "rk4_grad": executed_evaluations("rk4", "recursive", args.rk4_steps),
      "rk4_unrolled_grad": executed_evaluations("rk4", "unrolled", args.rk4_steps),
  }
  if not args.no_adjoint:
    executed["dopri5_backsolve_grad"] = executed_evaluations("dopri5", "backsolve",
                                                             args.dopri5_n_steps)

  # ---- PyTorch / torchdiffeq, the same weights
  tfields = {"torch": _torch_field(torch, kernel, bias, args.gamma)}
  if args.torch_one_conv:
    tfields["torch_one_conv"] = _torch_field(torch, kernel, bias, args.gamma, one_conv=True)
  tspan = torch.tensor([0.0, T])
  dopri_kw = dict(method="dopri5", rtol=args.rtol, atol=args.atol)
  rk4_kw = dict(method="rk4", options=dict(step_size=T / args.rk4_steps))

  def t_fwd(f, kw):
    with torch.no_grad():
      return torchdiffeq.odeint(f, xt, tspan, **kw)[-1]

  def t_grad(f, kw, adjoint=False):
    x0 = xt.clone().requires_grad_(True)
    solve = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
    y = solve(f, x0, tspan, **kw)[-1]
    loss = (y ** 2).sum()
    g = torch.autograd.grad(loss, [x0, f.weight, f.bias])
    return loss.detach(), y.detach(), g

  def count_nfe(f, fn):
    f.nfe = 0
    out = fn()
    return f.nfe, out

  # ---- agreement
  tf = tfields["torch"]
  check = {}
  check["field_max_abs_diff"] = float(np.max(np.abs(
      nchw(field.apply({"params": variables["params"]["field"]}, x))
      - tf(0.0, xt).detach().numpy())))
  y_ours = {k: np.asarray(compiled[f"{k}_fwd"](variables, x)) for k in ("dopri5", "rk4")}
  g_ours = {k: compiled[f"{k}_grad"](variables, x) for k in ("dopri5", "rk4", "rk4_unrolled")}
  if not args.no_adjoint:
    g_ours["dopri5_backsolve"] = compiled["dopri5_backsolve_grad"](variables, x)
  nfe_torch = {}
  nfe_torch["dopri5_fwd"], y_t_dopri = count_nfe(tf, lambda: t_fwd(tf, dopri_kw))
  nfe_torch["rk4_fwd"], y_t_rk4 = count_nfe(tf, lambda: t_fwd(tf, rk4_kw))
  nfe_torch["dopri5_grad"], (_, _, g_t_dopri) = count_nfe(tf, lambda: t_grad(tf, dopri_kw))
  nfe_torch["rk4_grad"], (_, _, g_t_rk4) = count_nfe(tf, lambda: t_grad(tf, rk4_kw))
  if not args.no_adjoint:
    nfe_torch["dopri5_adjoint_grad"], (_, _, g_t_adj) = count_nfe(
        tf, lambda: t_grad(tf, dopri_kw, adjoint=True))
  # torch, classical RK4 by hand: must match ours to float rounding
  x0c = xt.clone().requires_grad_(True)
  y_c = _torch_classic_rk4(torch, tf, x0c, args.rk4_steps)
  g_c = torch.autograd.grad((y_c ** 2).sum(), [x0c, tf.weight, tf.bias])
  # reference: torchdiffeq dopri5 in float64 at rtol = atol = 1e-9
  tf64 = _torch_field(torch, kernel, bias, args.gamma).double()
  with torch.no_grad():
    y_ref = torchdiffeq.odeint(tf64, xt.double(), tspan.double(), method="dopri5",
                               rtol=1e-9, atol=1e-9)[-1].numpy()

  def maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

  def err(a):
    """Error against the float64 reference: max abs, RMS, and RMS of the error scaled
    by atol + rtol |x| (the quantity the dopri5 controller keeps below 1 per step)."""
    d = np.asarray(a, np.float64) - y_ref
    return {"max_abs": float(np.max(np.abs(d))), "rms": float(np.sqrt(np.mean(d ** 2))),
            "rms_scaled": float(np.sqrt(np.mean((d / (args.atol + args.rtol
                                                      * np.abs(y_ref))) ** 2)))}

  def jgrads(g):
    """(d/dx0 NCHW, d/dK HWIO, d/db) from a jitted value_and_grad's result."""
    gv, gx = g[1]
    gp = gv["params"]["field"]
    return nchw(gx), np.asarray(gp["kernel"]), np.asarray(gp["bias"])

  def tgrads(g):
    return g[0].numpy(), hwio(g[1].numpy()), g[2].numpy()

  def grad_rel(a, b):
    """Max abs difference / max abs value of ``a``, for d/dx0, d/dK, d/db."""
    return {k: maxdiff(u, w) / float(np.max(np.abs(u)))
            for k, u, w in zip(("x0", "kernel", "bias"), a, b)}

  check["output_scale_max_abs"] = float(np.max(np.abs(y_ref)))
  check["dopri5_output_max_abs_diff_ours_torch"] = maxdiff(nchw(y_ours["dopri5"]),
                                                           y_t_dopri.numpy())
  check["dopri5_error_vs_f64_reference"] = {"ours": err(nchw(y_ours["dopri5"])),
                                            "torch": err(y_t_dopri.numpy())}
  check["dopri5_grad_rel_diff_ours_torch"] = grad_rel(jgrads(g_ours["dopri5"]), tgrads(g_t_dopri))
  check["rk4_output_max_abs_diff_ours_torchdiffeq"] = maxdiff(nchw(y_ours["rk4"]),
                                                             y_t_rk4.numpy())
  check["rk4_output_max_abs_diff_ours_torch_classic"] = maxdiff(nchw(y_ours["rk4"]),
                                                               y_c.detach().numpy())
  check["rk4_error_vs_f64_reference"] = {"ours": err(nchw(y_ours["rk4"])),
                                         "torchdiffeq (3/8 rule)": err(y_t_rk4.numpy())}
  check["rk4_grad_rel_diff_ours_torchdiffeq"] = grad_rel(jgrads(g_ours["rk4"]), tgrads(g_t_rk4))
  check["rk4_grad_rel_diff_ours_torch_classic"] = grad_rel(jgrads(g_ours["rk4"]), tgrads(g_c))
  check["rk4_unrolled_grad_rel_diff_recursive"] = grad_rel(jgrads(g_ours["rk4_unrolled"]),
                                                           jgrads(g_ours["rk4"]))
  if not args.no_adjoint:
    check["backsolve_grad_rel_diff_ours_torch_adjoint"] = grad_rel(
        jgrads(g_ours["dopri5_backsolve"]), tgrads(g_t_adj))
    check["backsolve_grad_rel_diff_ours_backsolve_ours_recursive"] = grad_rel(
        jgrads(g_ours["dopri5_backsolve"]), jgrads(g_ours["dopri5"]))
  if (check["field_max_abs_diff"] > 1e-4
      or check["rk4_output_max_abs_diff_ours_torch_classic"] > 1e-4):
    print(f"WARNING: the two fields disagree: {check}", file=sys.stderr)
  for k, f in tfields.items():
    if k != "torch":
      diff = maxdiff(f(0.0, xt).detach().numpy(), tf(0.0, xt).detach().numpy())
      check[f"field_max_abs_diff_{k}_vs_torch"] = diff

  # ---- NFE table: (forward, backward) per case and side
  nfe = {
      "dopri5 forward": {"ours": (nfe_ours["dopri5"]["nfe"], 0),
                         "torch": (nfe_torch["dopri5_fwd"], 0)},
      "dopri5 fwd+bwd": {"ours": (nfe_ours["dopri5"]["nfe"],
                                  nfe_ours["dopri5"]["nfe_backward"]),
                         "torch": (nfe_torch["dopri5_grad"], nfe_torch["dopri5_grad"])},
      "rk4 forward": {"ours": (nfe_ours["rk4"]["nfe"], 0), "torch": (nfe_torch["rk4_fwd"], 0)},
      "rk4 fwd+bwd": {"ours": (nfe_ours["rk4"]["nfe"], nfe_ours["rk4"]["nfe_backward"]),
                      "torch": (nfe_torch["rk4_grad"], nfe_torch["rk4_grad"])},
      "rk4 fwd+bwd, unrolled": {"ours": (nfe_ours["rk4_unrolled"]["nfe"],
                                         nfe_ours["rk4_unrolled"]["nfe_backward"]),
                                "torch": (nfe_torch["rk4_grad"], nfe_torch["rk4_grad"])},
  }
  if not args.no_adjoint:
    # torch: forward solve evaluations counted in forward; the rest in the backward solve
    nfe["dopri5 fwd+bwd, continuous adjoint"] = {
        "ours": (nfe_ours["dopri5"]["nfe"],
                 executed["dopri5_backsolve_grad"] - nfe_ours["dopri5"]["nfe"]),
        "torch": (nfe_torch["dopri5_fwd"],
                  nfe_torch["dopri5_adjoint_grad"] - nfe_torch["dopri5_fwd"])}

  # ---- timed functions
  def ours_call(name):
    fn = compiled[name]
    return lambda: jax.block_until_ready(fn(variables, x))

  cases = {
      "dopri5 forward": {"ours": ours_call("dopri5_fwd")},
      "dopri5 fwd+bwd": {"ours": ours_call("dopri5_grad")},
      "rk4 forward": {"ours": ours_call("rk4_fwd")},
      "rk4 fwd+bwd": {"ours": ours_call("rk4_grad")},
      "rk4 fwd+bwd, unrolled": {"ours": ours_call("rk4_unrolled_grad")},
  }
  if not args.no_adjoint:
    cases["dopri5 fwd+bwd, continuous adjoint"] = {"ours": ours_call("dopri5_backsolve_grad")}
  for k, f in tfields.items():
    cases["dopri5 forward"][k] = lambda f=f: t_fwd(f, dopri_kw).sum().item()
    cases["dopri5 fwd+bwd"][k] = lambda f=f: t_grad(f, dopri_kw)[0].item()
    cases["rk4 forward"][k] = lambda f=f: t_fwd(f, rk4_kw).sum().item()
    cases["rk4 fwd+bwd"][k] = lambda f=f: t_grad(f, rk4_kw)[0].item()
    cases["rk4 fwd+bwd, unrolled"][k] = lambda f=f: t_grad(f, rk4_kw)[0].item()
    if not args.no_adjoint:
      cases["dopri5 fwd+bwd, continuous adjoint"][k] = (
          lambda f=f: t_grad(f, dopri_kw, adjoint=True)[0].item())

  # ---- warm up (and size each measurement), then alternate
  calls = {}
  for case, sides in cases.items():
    calls[case] = {}
    for side, fn in sides.items():
      fn()
      w, _ = _timed(fn, 1)
      calls[case][side] = max(1, round(args.target_s / w))
  wall = {c: {s: [] for s in sides} for c, sides in cases.items()}
  cpu = {c: {s: [] for s in sides} for c, sides in cases.items()}
  for r in range(args.repeats):
    for case, sides in cases.items():
      order = list(sides) if r % 2 == 0 else list(sides)[::-1]
      for side in order:
        w, c = _timed(sides[side], calls[case][side])
        wall[case][side].append(B / w)
        cpu[case][side].append(B / c)

  torch_sides = list(tfields)
  exec_key = {"dopri5 fwd+bwd": "dopri5_grad", "rk4 fwd+bwd": "rk4_grad",
              "rk4 fwd+bwd, unrolled": "rk4_unrolled_grad",
              "dopri5 fwd+bwd, continuous adjoint": "dopri5_backsolve_grad"}
  results = {}
  for case in cases:
    row = {"nfe": {s: {"forward": nfe[case][s][0], "backward": nfe[case][s][1]}
                   for s in ("ours", "torch")},
           "ours_field_evaluations_executed": executed.get(exec_key.get(case),
                                                           sum(nfe[case]["ours"])),
           "calls_per_measurement": calls[case],
           "img_s_wall": {s: _stats(v) for s, v in wall[case].items()},
           "img_s_cpu": {s: _stats(v) for s, v in cpu[case].items()}}
    for ts in torch_sides:
      row[f"ratio_wall_vs_{ts}"] = _stats([o / t for o, t in zip(wall[case]["ours"],
                                                                 wall[case][ts])])
      row[f"ratio_cpu_vs_{ts}"] = _stats([o / t for o, t in zip(cpu[case]["ours"],
                                                               cpu[case][ts])])
    n_o, n_t = sum(nfe[case]["ours"]), sum(nfe[case]["torch"])
    row["nfe_ours_le_torch"] = n_o <= n_t
    row["goal_1_5x_met"] = bool(row["nfe_ours_le_torch"]
                                and row["ratio_wall_vs_torch"]["median"] >= 1.5)
    results[case] = row

  res = {
      "machine": {"cpu": _cpu_name(), "cpus_in_affinity": ncpu,
                  "os_cpu_count": os.cpu_count(), "pinned_core": args.pin_core,
                  "load_average_1min_end": os.getloadavg()[0]},
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "jaxlib": getattr(__import__("jaxlib.version").version, "__version__", "?"),
                   "flax": __import__("flax").__version__, "diffrax": diffrax.__version__,
                   "torch": torch.__version__,
                   "torchdiffeq": getattr(torchdiffeq, "__version__", "?")},
      "threads": {"xla_intra_op (CPUs in affinity)": ncpu, "torch": torch.get_num_threads()},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "command": " ".join([os.path.basename(sys.executable), "benchmarks/ode.py"]
                          + (list(argv) if argv is not None else sys.argv[1:])),
      "problem": {"batch": B, "height": S, "width": S, "channels": C, "t1": T,
                  "gamma": args.gamma, "act": "tanh", "kernel_size": 3,
                  "rtol": args.rtol, "atol": args.atol, "rk4_steps": args.rk4_steps,
                  "ours_dopri5_first_step": T / args.dopri5_n_steps,
                  "torch_field": "conv2d(x, K) - conv_transpose2d(x, K)",
                  "torch_rk4": "torchdiffeq 'rk4' = 3/8-rule RK4; ours classical RK4"},
      "repeats": args.repeats, "target_s": args.target_s,
      "compile_s": compile_s,
      "ours_ode_stats": nfe_ours,
      "ours_field_evaluations_executed_per_gradient": executed,
      "torch_nfe_counted": nfe_torch,
      "agreement_check": check,
      "cases": results,
      "total_run_s": None,
  }
  res["goal_met_all_cases"] = all(r["goal_1_5x_met"] for r in results.values())
  res["total_run_s"] = time.perf_counter() - t_start

  # ---- report
  print(f"\nSkew-symmetric conv ODE block, state {B} x {S} x {S} x {C}, T = {T:g}, tanh, "
        f"gamma {args.gamma:g}: jaxdefense vs torchdiffeq\n(one process, alternating, "
        f"{args.repeats} repeats, about {args.target_s:g} s per measurement)")
  print(f"machine   {res['machine']['cpu']}, {ncpu} CPU(s) used"
        f"{' (pinned to CPU %d)' % args.pin_core if args.pin_core is not None else ''}, "
        f"load average {res['machine']['load_average_1min_end']:.1f} at the end")
  v = res["versions"]
  print(f"versions  jax {v['jax']} / jaxlib {v['jaxlib']} / flax {v['flax']} / diffrax "
        f"{v['diffrax']} / torch {v['torch']} / torchdiffeq {v['torchdiffeq']}")
  print(f"threads   XLA {ncpu} (one per CPU), torch {torch.get_num_threads()}; "
        f"XLA_FLAGS='{res['xla_flags']}'")
  print("compile   " + ", ".join(f"{k} {s:.1f} s" for k, s in compile_s.items()))
  print("\n  agreement (max abs difference; gradients: max abs diff / max abs value)")
  print(f"    field F(x): {check['field_max_abs_diff']:.1e}; |x(T)| up to "
        f"{check['output_scale_max_abs']:.2f}")
  e = check["dopri5_error_vs_f64_reference"]
  gd = check["dopri5_grad_rel_diff_ours_torch"]
  print(f"    dopri5 x(T) ours vs torch {check['dopri5_output_max_abs_diff_ours_torch']:.1e}; "
        f"grads x0 {gd['x0']:.1e}, K {gd['kernel']:.1e}, b {gd['bias']:.1e}")
  print(f"      error vs float64 1e-9 solve, max abs / RMS / RMS scaled by atol + rtol|x|: "
        f"ours {e['ours']['max_abs']:.1e} / {e['ours']['rms']:.1e} / "
        f"{e['ours']['rms_scaled']:.2f}, torch {e['torch']['max_abs']:.1e} / "
        f"{e['torch']['rms']:.1e} / {e['torch']['rms_scaled']:.2f}")
  e = check["rk4_error_vs_f64_reference"]
  gd = check["rk4_grad_rel_diff_ours_torchdiffeq"]
  gc = check["rk4_grad_rel_diff_ours_torch_classic"]
  print(f"    rk4 x(T) ours vs torchdiffeq (3/8 rule) "
        f"{check['rk4_output_max_abs_diff_ours_torchdiffeq']:.1e}, vs classical RK4 in torch "
        f"{check['rk4_output_max_abs_diff_ours_torch_classic']:.1e}; error vs float64 "
        f"(max abs / RMS): ours {e['ours']['max_abs']:.1e} / {e['ours']['rms']:.1e}, "
        f"torchdiffeq {e['torchdiffeq (3/8 rule)']['max_abs']:.1e} / "
        f"{e['torchdiffeq (3/8 rule)']['rms']:.1e}")
  print(f"    rk4 grads vs torchdiffeq: x0 {gd['x0']:.1e}, K {gd['kernel']:.1e}, b "
        f"{gd['bias']:.1e}; vs classical RK4 in torch: x0 {gc['x0']:.1e}, K "
        f"{gc['kernel']:.1e}, b {gc['bias']:.1e}")
  if not args.no_adjoint:
    ga = check["backsolve_grad_rel_diff_ours_torch_adjoint"]
    gb = check["backsolve_grad_rel_diff_ours_backsolve_ours_recursive"]
    print(f"    continuous adjoint grads, backsolve vs odeint_adjoint: x0 {ga['x0']:.1e}, K "
          f"{ga['kernel']:.1e}, b {ga['bias']:.1e}; backsolve vs recursive (ours): x0 "
          f"{gb['x0']:.1e}, K {gb['kernel']:.1e}, b {gb['bias']:.1e}")
  print("    ours, field evaluations executed per gradient (incl. recomputation): "
        + ", ".join(f"{k} {n}" for k, n in executed.items()))

  print("\n  images/s: median [min, max] over repeats; ratio = ours / torch per repeat; "
        "NFE = forward + backward\n  (vector-Jacobian products); executed = field "
        "evaluations ours runs in one call, recomputation included")
  hdr = (f"  {'case':36s} {'NFE ours':>10s} {'(executed)':>10s} {'NFE torch':>10s} "
         f"{'ours img/s':>22s}")
  for ts in torch_sides:
    hdr += f" {ts + ' img/s':>22s}"
  hdr += f" {'ratio wall':>20s} {'ratio CPU':>20s}"
  if len(torch_sides) > 1:
    hdr += f" {'ratio vs one-conv':>20s}"
  hdr += "  goal"
  print(hdr)
  for case, row in results.items():
    no, nt = nfe[case]["ours"], nfe[case]["torch"]
    fmt_n = lambda n: f"{n[0]}" if n[1] == 0 else f"{n[0]}+{n[1]}"
    ex = row["ours_field_evaluations_executed"]
    line = (f"  {case:36s} {fmt_n(no):>10s} {ex:>10d} {fmt_n(nt):>10s} "
            f"{_fmt(row['img_s_wall']['ours']):>22s}")
    for ts in torch_sides:
      line += f" {_fmt(row['img_s_wall'][ts]):>22s}"
    line += (f" {_fmt(row['ratio_wall_vs_torch'], 2):>20s} "
             f"{_fmt(row['ratio_cpu_vs_torch'], 2):>20s}")
    if len(torch_sides) > 1:
      line += f" {_fmt(row['ratio_wall_vs_torch_one_conv'], 2):>20s}"
    line += "  " + ("met" if row["goal_1_5x_met"] else "NOT met")
    print(line)
  met = sum(r["goal_1_5x_met"] for r in results.values())
  print(f"\n  goal (>= 1.5x torchdiffeq's wall-clock throughput at <= its NFE): met in "
        f"{met} of {len(results)} cases. Total run {res['total_run_s']:.0f} s.")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(res, f, indent=1)
    print(f"  wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
