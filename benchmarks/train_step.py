"""ResNet-20 training throughput: jaxdefense against PyTorch, side by side in one process.

Run from the repository root::

  python benchmarks/train_step.py                 # 7 repeats x 3 steps, 2-4 minutes
  python benchmarks/train_step.py --quick         # smoke run (about a minute)
  python benchmarks/train_step.py --json out.json --repeats 9
  python benchmarks/train_step.py --pin-core 1    # one core for both: CPU efficiency

What is timed.  One SGD step (momentum 0.9, weight decay 5e-4, lr 0.1) of a CIFAR
ResNet-20 (basic blocks, option-A zero-padding shortcuts, 269,722 parameters) on one
CIFAR-shaped batch (default 128 x 32 x 32 x 3, float32), train-mode batch norm,
softmax cross-entropy:

* ours: ``jaxdefense.models.create("resnet20")`` with optax, one ``jax.jit`` step
  (``donate_argnums`` on the state, compiled ahead with ``.lower().compile()``, compile
  time reported apart), ``block_until_ready`` after every step;
* reference: the same network written in PyTorch below (NCHW, ``torch.optim.SGD``),
  started from the same weights (copied from the Flax variables; the logits, loss and
  gradients are checked to agree before timing).

Both frameworks alternate within each repeat (the order flips every repeat), so they see
the same machine load; each repeat gives images/s for both and one ratio ours/torch.
Medians with [min, max] over repeats are printed.  Also timed: the forward pass alone
(evaluation mode, ``torch.no_grad``), and a large f32 matrix product (``jnp.dot``,
2048^3) as the machine's measured peak, one sample per repeat.

Two clocks.  Wall-clock images/s is the headline.  On a shared machine it depends on
how each runtime copes with other processes (PyTorch's OpenMP threads wait for each
other at every op, XLA's thread pool does not), so the process CPU time per step is
printed as well; with ``--pin-core N`` (both frameworks on one core, one thread each)
it measures the work each framework does per step, independently of the load.  With two
or more threads the CPU time includes the time OpenMP threads spend spinning.

FLOPs.  GFLOP/s use an analytic count: the multiply-adds of every convolution and the
dense layer (x2), times 3 for the forward and the two backward products (the stem's
input gradient, which neither framework computes, is included by this convention).
XLA's own count for the compiled step (``cost_analysis``) is printed next to it.

XLA flags.  By default the script installs ``jaxdefense._xla_flags``'s recommended
CPU flags before JAX starts, by importing it first, as any plain script that imports
the library gets them (``--xla-flags none`` sets ``JAXDEFENSE_NO_XLA_FLAGS=1`` and keeps
``XLA_FLAGS`` as given).
``--plain-conv`` also times our model with the library's plain convolution (the code
path before the training-speed change in ``jaxdefense/nn/_layers.py``) as a third
column, for an A/B of that change in one process.

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
  p.add_argument("--quick", action="store_true", help="3 repeats x 1 step, small eval")
  p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7)")
  p.add_argument("--steps", type=int, default=None,
                 help="steps per framework per repeat (default 3)")
  p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
  p.add_argument("--json", default=None, metavar="PATH", help="write all timings here")
  p.add_argument("--xla-flags", choices=("recommended", "none"), default="recommended",
                 help="recommended (default): what `import jaxdefense` installs, as in a plain "
                      "script; none: JAXDEFENSE_NO_XLA_FLAGS=1, XLA_FLAGS as given")
  p.add_argument("--pin-core", type=int, default=None, metavar="CPU",
                 help="run on this one CPU only (both frameworks single-threaded)")
  p.add_argument("--plain-conv", action="store_true",
                 help="also time our model with the plain convolution path")
  p.add_argument("--no-eval", action="store_true", help="skip the forward-only timing")
  args = p.parse_args(argv)
  if args.repeats is None:
    args.repeats = 3 if args.quick else 7
  if args.steps is None:
    args.steps = 1 if args.quick else 3
  if args.repeats < 1 or args.steps < 1 or args.batch < 1:
    p.error("--repeats, --steps and --batch must be >= 1")
  return args


# ------------------------------------------------------------------ PyTorch side
def _torch_model(torch):
  nn, F = torch.nn, torch.nn.functional

  class Block(nn.Module):
    """Post-activation basic block; option-A shortcut (subsample + zero channels)."""

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.stride, self.extra = stride, cout - cin

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      sc = x
      if self.stride != 1 or self.extra:
        e = self.extra
        sc = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, e // 2, e - e // 2))
      return F.relu(out + sc)

  class ResNet20(nn.Module):
    def __init__(self, n=3, num_classes=10):
      super().__init__()
      self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.bn = nn.BatchNorm2d(16)
      blocks, cin = [], 16
      for width, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
          blocks.append(Block(cin, width, stride if i == 0 else 1))
          cin = width
      self.blocks = nn.Sequential(*blocks)
      self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
      x = F.relu(self.bn(self.conv(x)))
      x = self.blocks(x)
      return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

  return ResNet20()


def _copy_flax_to_torch(torch, tmodel, variables) -> None:
  """Load the Flax ResNet-20 variables into the PyTorch model (layouts converted)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  params, stats = variables["params"], variables["batch_stats"]

  def t(a):
    return torch.from_numpy(np.array(a, dtype=np.float32))

  def conv(mod, p):
    mod.weight.data.copy_(t(np.transpose(np.asarray(p["kernel"]), (3, 2, 0, 1))))

  def bn(mod, p, s):
    mod.weight.data.copy_(t(p["scale"]))
    mod.bias.data.copy_(t(p["bias"]))
    mod.running_mean.copy_(t(s["mean"]))
    mod.running_var.copy_(t(s["var"]))

  conv(tmodel.conv, params["Conv_0"])
  bn(tmodel.bn, params["BatchNorm_0"], stats["BatchNorm_0"])
  for i, blk in enumerate(tmodel.blocks):
    p, s = params[f"block{i}"], stats[f"block{i}"]
    conv(blk.conv1, p["Conv_0"])
    conv(blk.conv2, p["Conv_1"])
    bn(blk.bn1, p["BatchNorm_0"], s["BatchNorm_0"])
    bn(blk.bn2, p["BatchNorm_1"], s["BatchNorm_1"])
  tmodel.fc.weight.data.copy_(t(np.asarray(params["Dense_0"]["kernel"]).T))
  tmodel.fc.bias.data.copy_(t(params["Dense_0"]["bias"]))


# ------------------------------------------------------------------- FLOP count
def resnet_cifar_forward_flops(n: int = 3, hw: int = 32, widths=(16, 32, 64),
                               num_classes: int = 10) -> int:
  """Multiply-add FLOPs (2 per MAC) of one image through a CIFAR ResNet-(6n+2)."""
  macs = hw * hw * 3 * widths[0] * 9  # stem
  cin, size = widths[0], hw
  for stage, width in enumerate(widths):
    for i in range(n):
      stride = 2 if (stage > 0 and i == 0) else 1
      size //= stride
      macs += size * size * cin * width * 9 + size * size * width * width * 9
      cin = width
  macs += widths[-1] * num_classes
  return 2 * macs


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
  # A plain script: `import jaxdefense` installs the recommended XLA:CPU flags before JAX
  # starts (jaxdefense/_xla_flags.py); "none" opts out and keeps XLA_FLAGS as given.
  if args.xla_flags == "none":
    os.environ["JAXDEFENSE_NO_XLA_FLAGS"] = "1"
  import jaxdefense  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import torch
  import jaxdefense as jd
  from jaxdefense.nn import _layers
  # pylint: enable=import-outside-toplevel

  ncpu = len(os.sched_getaffinity(0))
  torch.set_num_threads(ncpu)  # XLA's intra-op pool has one thread per schedulable CPU
  B = args.batch
  rng = np.random.default_rng(0)
  x_np = rng.uniform(0.0, 1.0, (B, 32, 32, 3)).astype(np.float32)
  y_np = rng.integers(0, 10, (B,)).astype(np.int32)
  lr, momentum, wd = 0.1, 0.9, 5e-4

  # ---- ours
  model = jd.models.create("resnet20")
  x, y = jnp.asarray(x_np), jnp.asarray(y_np)
  variables = model.init(jax.random.PRNGKey(0), x)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
  tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=momentum))

  def loss_fn(params, batch_stats, x, y):
    logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, x,
                              train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, upd["batch_stats"])

  def make_train_step():
    # A new function object each time: jax caches traces by function identity, and the
    # --plain-conv variant must be traced again.
    def train_step(state, x, y):
      params, batch_stats, opt_state = state
      (loss, (_, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, batch_stats, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), batch_stats, opt_state), loss
    return train_step

  def fresh_state():
    params = jax.tree.map(jnp.array, variables["params"])
    return (params, jax.tree.map(jnp.array, variables["batch_stats"]), tx.init(params))

  def compile_step():
    t0 = time.perf_counter()
    c = jax.jit(make_train_step(), donate_argnums=(0,)).lower(fresh_state(), x, y).compile()
    return c, time.perf_counter() - t0

  step_c, compile_s = compile_step()
  cost = step_c.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float((cost or {}).get("flops", float("nan")))
  eval_c = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()

  sides = {}
  state = [fresh_state()]

  def ours_step():
    state[0], loss = step_c(state[0], x, y)
    jax.block_until_ready((state[0], loss))
  sides["ours"] = ours_step

  if args.plain_conv:
    saved = _layers._conv
    _layers._conv = _layers._conv_plain  # the convolution path before the change
    try:
      plain_c, _ = compile_step()
      assert plain_c.as_text().count("gather") < step_c.as_text().count("gather")
    finally:
      _layers._conv = saved
    plain_state = [fresh_state()]

    def plain_step():
      plain_state[0], loss = plain_c(plain_state[0], x, y)
      jax.block_until_ready((plain_state[0], loss))
    sides["ours_plain_conv"] = plain_step

  # ---- PyTorch, from the same weights; check that the two compute the same thing
  torch.manual_seed(0)
  tmodel = _torch_model(torch)
  t_params = sum(p.numel() for p in tmodel.parameters())
  _copy_flax_to_torch(torch, tmodel, variables)
  xt = torch.from_numpy(np.ascontiguousarray(np.transpose(x_np, (0, 3, 1, 2))))
  yt = torch.from_numpy(y_np.astype(np.int64))
  tmodel.train()
  t_logits = tmodel(xt)
  t_loss = torch.nn.functional.cross_entropy(t_logits, yt)
  t_loss.backward()
  (j_loss, (j_logits, _)), j_grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      variables["params"], variables["batch_stats"], x, y)
  j_gk = np.transpose(np.asarray(j_grads["block4"]["Conv_1"]["kernel"]), (3, 2, 0, 1))
  check = {
      "logits_max_abs_diff": float(np.max(np.abs(np.asarray(j_logits)
                                                 - t_logits.detach().numpy()))),
      "loss_abs_diff": abs(float(j_loss) - t_loss.item()),
      "grad_block4_conv2_rel_diff": float(
          np.max(np.abs(j_gk - tmodel.blocks[4].conv2.weight.grad.numpy()))
          / np.max(np.abs(j_gk))),
  }
  if check["loss_abs_diff"] > 1e-3 or check["grad_block4_conv2_rel_diff"] > 1e-2:
    print(f"WARNING: the two models disagree: {check}", file=sys.stderr)
  opt = torch.optim.SGD(tmodel.parameters(), lr=lr, momentum=momentum, weight_decay=wd)

  def torch_step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(tmodel(xt), yt)
    loss.backward()
    opt.step()
    loss.item()
  sides["torch"] = torch_step

  def ours_eval():
    eval_c(variables, x).block_until_ready()

  tmodel_eval = _torch_model(torch)
  _copy_flax_to_torch(torch, tmodel_eval, variables)
  tmodel_eval.eval()

  def torch_eval():
    with torch.no_grad():
      tmodel_eval(xt).sum().item()
  eval_sides = {"ours": ours_eval, "torch": torch_eval}

  a = jnp.asarray(rng.standard_normal((2048, 2048), dtype=np.float32))
  dot_c = jax.jit(jnp.dot).lower(a, a).compile()
  dot_flops = 2.0 * 2048 ** 3

  def peak_sample():
    dot_c(a, a).block_until_ready()
    w, _ = _timed(lambda: dot_c(a, a).block_until_ready(), 3)
    return dot_flops / w / 1e9

  # ---- warm up, then alternate
  for fn in list(sides.values()) + list(eval_sides.values()):
    fn()
    fn()
  names = list(sides)
  wall = {k: [] for k in names}
  cpu = {k: [] for k in names}
  ewall = {k: [] for k in eval_sides}
  peaks = []
  eval_steps = max(2, 3 * args.steps)
  for r in range(args.repeats):
    peaks.append(peak_sample())
    order = names if r % 2 == 0 else names[::-1]
    for k in order:
      w, c = _timed(sides[k], args.steps)
      wall[k].append(B / w)
      cpu[k].append(B / c)
    if not args.no_eval:
      for k in (list(eval_sides) if r % 2 == 0 else list(eval_sides)[::-1]):
        w, _ = _timed(eval_sides[k], eval_steps)
        ewall[k].append(B / w)

  train_flops = 3 * resnet_cifar_forward_flops() * B
  res = {
      "machine": {"cpu": _cpu_name(), "cpus_in_affinity": ncpu,
                  "os_cpu_count": os.cpu_count(), "pinned_core": args.pin_core,
                  "load_average_1min_end": os.getloadavg()[0]},
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "jaxlib": getattr(__import__("jaxlib.version").version, "__version__", "?"),
                   "flax": __import__("flax").__version__, "optax": optax.__version__,
                   "torch": torch.__version__},
      "threads": {"xla_intra_op (CPUs in affinity)": ncpu, "torch": torch.get_num_threads()},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "batch": B, "repeats": args.repeats, "steps_per_repeat": args.steps,
      "params": {"ours": n_params, "torch": t_params},
      "agreement_check": check,
      "compile_s": compile_s,
      "train_img_s_wall": {k: _stats(v) for k, v in wall.items()},
      "train_img_s_cpu": {k: _stats(v) for k, v in cpu.items()},
      "ratio_wall": _stats([o / t for o, t in zip(wall["ours"], wall["torch"])]),
      "ratio_cpu": _stats([o / t for o, t in zip(cpu["ours"], cpu["torch"])]),
      # CPU seconds per wall second while stepping: how many cores a framework kept busy
      "cores_busy": {k: _stats([w / c for w, c in zip(wall[k], cpu[k])]) for k in names},
      "flops_per_step_analytic": train_flops,
      "flops_per_step_xla": xla_flops,
      "matmul_peak_gflops": _stats(peaks),
  }
  if args.plain_conv:
    res["ratio_wall_plain_conv"] = _stats(
        [o / t for o, t in zip(wall["ours_plain_conv"], wall["torch"])])
    res["ratio_cpu_plain_conv"] = _stats(
        [o / t for o, t in zip(cpu["ours_plain_conv"], cpu["torch"])])
  peak = res["matmul_peak_gflops"]["median"]
  res["train_gflops"] = {k: train_flops / 1e9 * res["train_img_s_wall"][k]["median"] / B
                         for k in names}
  res["train_pct_of_peak"] = {k: 100 * g / peak for k, g in res["train_gflops"].items()}
  if not args.no_eval:
    res["eval_img_s_wall"] = {k: _stats(v) for k, v in ewall.items()}
    res["eval_ratio_wall"] = _stats([o / t for o, t in zip(ewall["ours"], ewall["torch"])])

  # ---- report
  print(f"\nResNet-20 training step, batch {B}, float32: jaxdefense vs PyTorch "
        f"(one process, alternating, {args.repeats} repeats x {args.steps} steps)")
  print(f"machine   {res['machine']['cpu']}, {ncpu} CPU(s) used"
        f"{' (pinned to CPU %d)' % args.pin_core if args.pin_core is not None else ''}, "
        f"load average {res['machine']['load_average_1min_end']:.1f}")
  v = res["versions"]
  print(f"versions  jax {v['jax']} / jaxlib {v['jaxlib']} / flax {v['flax']} / optax "
        f"{v['optax']} / torch {v['torch']}")
  print(f"threads   XLA {ncpu} (one per CPU), torch {torch.get_num_threads()}; "
        f"XLA_FLAGS='{res['xla_flags']}'")
  print(f"params    ours {n_params:,}, torch {t_params:,}; agreement: loss diff "
        f"{check['loss_abs_diff']:.1e}, logits diff {check['logits_max_abs_diff']:.1e}, "
        f"grad rel diff {check['grad_block4_conv2_rel_diff']:.1e}; compile {compile_s:.1f} s")
  print("\n  images/s: median [min, max] over repeats; ratio = ours / torch per repeat")
  print(f"  {'':28s} {'ours':>24s} {'torch':>24s} {'ratio':>22s}")
  print(f"  {'train step, wall clock':28s} {_fmt(res['train_img_s_wall']['ours']):>24s} "
        f"{_fmt(res['train_img_s_wall']['torch']):>24s} {_fmt(res['ratio_wall'], 2):>22s}")
  print(f"  {'train step, process CPU':28s} {_fmt(res['train_img_s_cpu']['ours']):>24s} "
        f"{_fmt(res['train_img_s_cpu']['torch']):>24s} {_fmt(res['ratio_cpu'], 2):>22s}")
  print(f"  {'cores kept busy (CPU/wall)':28s} {_fmt(res['cores_busy']['ours'], 2):>24s} "
        f"{_fmt(res['cores_busy']['torch'], 2):>24s}")
  if args.plain_conv:
    print(f"  {'  ours, plain conv (wall)':28s} "
          f"{_fmt(res['train_img_s_wall']['ours_plain_conv']):>24s} {'':>24s} "
          f"{_fmt(res['ratio_wall_plain_conv'], 2):>22s}")
    print(f"  {'  ours, plain conv (CPU)':28s} "
          f"{_fmt(res['train_img_s_cpu']['ours_plain_conv']):>24s} {'':>24s} "
          f"{_fmt(res['ratio_cpu_plain_conv'], 2):>22s}")
  if not args.no_eval:
    print(f"  {'forward only (eval), wall':28s} {_fmt(res['eval_img_s_wall']['ours']):>24s} "
          f"{_fmt(res['eval_img_s_wall']['torch']):>24s} "
          f"{_fmt(res['eval_ratio_wall'], 2):>22s}")
  print(f"\n  FLOPs per step: {train_flops / 1e9:.1f} GFLOP (analytic, 3 x forward "
        f"conv+dense); XLA cost analysis {xla_flops / 1e9:.1f} GFLOP")
  print(f"  f32 matmul peak (jnp.dot 2048^3): {_fmt(res['matmul_peak_gflops'])} GFLOP/s")
  for k in names:
    print(f"  achieved, {k:16s} {res['train_gflops'][k]:6.1f} GFLOP/s = "
          f"{res['train_pct_of_peak'][k]:4.1f} % of peak")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(res, f, indent=1)
    print(f"\n  wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
