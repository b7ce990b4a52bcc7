"""PGD speed and strength: jaxdefense against a PyTorch reference, side by side.

Run from the repository root::

  python benchmarks/attacks.py            # full run (PGD-20, batch 128, 5 repeats)
  python benchmarks/attacks.py --quick    # smoke run (seconds)

1. Speed.  PGD-20 (l-inf, eps 8/255, step 2/255, uniform random start) on one
   CIFAR-shaped batch (128 x 32 x 32 x 3) against ResNet-20 in evaluation mode:
   ``jaxdefense.attacks.pgd`` on ``jaxdefense.models.create("resnet20")`` (jitted once,
   compile time reported separately) against PyTorch PGD on an identical PyTorch
   ResNet-20 into which the Flax weights are copied (the logits are checked to agree).
   The reference is ``torchattacks.PGD`` when torchattacks is installed; otherwise a
   loop written to do exactly what ``torchattacks.PGD.forward`` does (random start in
   the ball, ``autograd.grad`` of the mean cross-entropy, ``x + alpha * sign(g)``,
   clamp to the ball and to [0, 1], ``detach``).  The two frameworks alternate in each
   repeat, so both see the same machine load; medians and the time ratio are printed.

2. Strength parity.  An MLP trained on scikit-learn's digits (8x8, no download) with
   optax is copied into ``torch.nn.Sequential``; both frameworks run the same attacks
   on the same test images and report robust accuracy (PGD with its random start, and
   the deterministic IFGSM, whose results should agree to float rounding).  The
   robust accuracies should agree within one point.

XLA flags: the recommended XLA:CPU flags of ``jaxdefense._xla_flags`` are installed
before JAX starts by ``import jaxdefense``, as in any plain script (``--xla-flags none``
keeps ``XLA_FLAGS`` as given).  The speed section also prints both frameworks' arithmetic rate against
this machine's matrix-multiply peak, which bounds the speed-up any framework can have.
The reference is ``pip install --no-deps torchattacks==3.5.1`` when present (its
declared dependencies would downgrade ``requests``; it needs only torch).

Nothing here is imported by the library; the numbers go into BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import zlib

# XLA_FLAGS as given, before `import jaxdefense` below adds the recommended flags
# (``--xla-flags none`` restores it; JAX's backend starts only later, in main).
_GIVEN_XLA_FLAGS = os.environ.get("XLA_FLAGS")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxdefense as jd  # noqa: E402


# ----------------------------------------------------------------- PyTorch side


def _torch():
  try:
    import torch
  except ImportError as err:  # pragma: no cover - depends on the machine
    sys.exit(f"PyTorch is needed for this benchmark (pip install torch): {err}")
  return torch


def _torchattacks():
  try:
    import torchattacks
    return torchattacks
  except ImportError:
    return None


def torch_pgd(model, images, labels, eps, alpha, steps, random_start=True):
  """PyTorch PGD, step for step what ``torchattacks.PGD.forward`` (v3.5) does."""
  torch = _torch()
  loss = torch.nn.CrossEntropyLoss()
  images = images.clone().detach()
  labels = labels.clone().detach()
  adv = images.clone().detach()
  if random_start:
    adv = adv + torch.empty_like(adv).uniform_(-eps, eps)
    adv = torch.clamp(adv, min=0, max=1).detach()
  for _ in range(steps):
    adv.requires_grad = True
    cost = loss(model(adv), labels)
    grad = torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)[0]
    adv = adv.detach() + alpha * grad.sign()
    delta = torch.clamp(adv - images, min=-eps, max=eps)
    adv = torch.clamp(images + delta, min=0, max=1).detach()
  return adv


def make_torch_pgd(model, eps, alpha, steps, random_start=True):
  """``attack(images, labels)`` with torchattacks if installed, else :func:`torch_pgd`."""
  ta = _torchattacks()
  if ta is not None:
    atk = ta.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
    return atk, f"torchattacks {ta.__version__} PGD"
  return (lambda x, y: torch_pgd(model, x, y, eps, alpha, steps, random_start),
          "PyTorch PGD loop equivalent to torchattacks.PGD (torchattacks not installed)")


def torch_resnet20(variables):
  """A PyTorch CIFAR ResNet-20 (basic blocks, option-A shortcuts) holding the weights
  of ``jd.models.create("resnet20")``'s ``variables``, in evaluation mode."""
  torch = _torch()
  nn, F = torch.nn, torch.nn.functional
  params, stats = variables["params"], variables["batch_stats"]

  def conv(p, stride):
    w = np.asarray(p["kernel"])  # HWIO
    c = nn.Conv2d(w.shape[2], w.shape[3], w.shape[0], stride, w.shape[0] // 2, bias=False)
    c.weight.data = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
    return c

  def bn(p, s):
    b = nn.BatchNorm2d(p["scale"].shape[0], eps=1e-5)
    b.weight.data = torch.from_numpy(np.asarray(p["scale"]).copy())
    b.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())
    b.running_mean.data = torch.from_numpy(np.asarray(s["mean"]).copy())
    b.running_var.data = torch.from_numpy(np.asarray(s["var"]).copy())
    return b

  class Block(nn.Module):
    def __init__(self, p, s, stride):
      super().__init__()
      self.conv1, self.bn1 = conv(p["Conv_0"], stride), bn(p["BatchNorm_0"], s["BatchNorm_0"])
      self.conv2, self.bn2 = conv(p["Conv_1"], 1), bn(p["BatchNorm_1"], s["BatchNorm_1"])
      self.stride = stride
      self.extra = self.conv2.out_channels - self.conv1.in_channels

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      sc = x
      if self.stride != 1 or self.extra:
        sc = x[:, :, ::self.stride, ::self.stride]
        sc = F.pad(sc, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
      return F.relu(out + sc)

  class ResNet20(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv = conv(params["Conv_0"], 1)
      self.bn = bn(params["BatchNorm_0"], stats["BatchNorm_0"])
      blocks = []
      for i in range(9):
        stride = 2 if i in (3, 6) else 1
        blocks.append(Block(params[f"block{i}"], stats[f"block{i}"], stride))
      self.blocks = nn.Sequential(*blocks)
      d = params["Dense_0"]
      self.fc = nn.Linear(d["kernel"].shape[0], d["kernel"].shape[1])
      self.fc.weight.data = torch.from_numpy(np.ascontiguousarray(np.asarray(d["kernel"]).T))
      self.fc.bias.data = torch.from_numpy(np.asarray(d["bias"]).copy())

    def forward(self, x):
      x = F.relu(self.bn(self.conv(x)))
      x = self.blocks(x)
      return self.fc(x.mean(dim=(2, 3)))

  return ResNet20().eval()


# ------------------------------------------------------------------ helpers


def _randomise_batch_stats(variables, key):
  """Non-trivial BN statistics, so the weight copy is checked on every parameter."""
  def draw(path, leaf):
    k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()))
    if jax.tree_util.keystr(path).endswith("['var']"):
      return jax.random.uniform(k, leaf.shape, leaf.dtype, 0.5, 1.5)
    return 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype)

  stats = jax.tree_util.tree_map_with_path(draw, variables["batch_stats"])
  return {**variables, "batch_stats": stats}


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def bench_speed(args):
  torch = _torch()
  batch, steps, eps, alpha = args.batch, args.steps, 8 / 255, 2 / 255
  key = jax.random.key(0)
  rng = np.random.RandomState(0)
  x = rng.uniform(size=(batch, 32, 32, 3)).astype(np.float32)
  y = rng.randint(0, 10, size=batch).astype(np.int32)

  model = jd.models.create("resnet20", num_classes=10)
  variables = model.init(key, jnp.asarray(x[:2]))
  variables = _randomise_batch_stats(variables, jax.random.key(1))
  t_model = torch_resnet20(variables)

  x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  y_t = torch.from_numpy(y.astype(np.int64))
  with torch.no_grad():
    ref = np.asarray(model.apply(variables, x, train=False))
    diff = np.abs(t_model(x_t).numpy() - ref)
  print(f"  weight copy check: max |logits_torch - logits_jax| = {diff.max():.2e} "
        f"(logits up to {np.abs(ref).max():.1f})")

  @jax.jit
  def jax_attack(variables, x, y, key):
    logits_fn = lambda z: model.apply(variables, z, train=False)
    return jd.attacks.pgd(logits_fn, x, y, key=key, eps=eps, step_size=alpha, steps=steps)

  @jax.jit
  def plain_jax_pgd(variables, x, y, key):
    """The same PGD written directly in JAX (no library): measures library overhead."""
    def loss(z):
      logits = model.apply(variables, z, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def body(_, adv):
      adv = adv + alpha * jnp.sign(jax.grad(loss)(adv))
      return jnp.clip(jnp.clip(adv, x - eps, x + eps), 0.0, 1.0)

    start = jnp.clip(x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps), 0.0, 1.0)
    return jax.lax.fori_loop(0, steps, body, start)

  xj, yj = jnp.asarray(x), jnp.asarray(y)
  _, t_first = _timed(lambda: jax_attack(variables, xj, yj, key).block_until_ready())
  plain_jax_pgd(variables, xj, yj, key).block_until_ready()  # compile
  t_attack, ref_name = make_torch_pgd(t_model, eps, alpha, steps)
  t_attack(x_t, y_t)  # warm-up

  times = {"jaxdefense": [], "plain JAX": [], "PyTorch": []}
  for r in range(args.repeats):
    k = jax.random.fold_in(key, r)
    x_adv, t = _timed(lambda: jax_attack(variables, xj, yj, k).block_until_ready())
    times["jaxdefense"].append(t)
    _, t = _timed(lambda: plain_jax_pgd(variables, xj, yj, k).block_until_ready())
    times["plain JAX"].append(t)
    x_adv_t, t = _timed(lambda: t_attack(x_t, y_t))
    times["PyTorch"].append(t)

  med = {name: statistics.median(ts) for name, ts in times.items()}
  budget = float(jnp.max(jnp.abs(x_adv - xj)))
  budget_t = float((x_adv_t - x_t).abs().max())
  print(f"  reference: {ref_name}")
  print(f"  PGD-{steps}, eps 8/255, step 2/255, batch {batch}x32x32x3, ResNet-20 (eval mode)")
  print(f"  jaxdefense first call (compile + run): {t_first:7.2f} s")
  for name, ts in times.items():
    print(f"  {name:11s} median of {args.repeats}: {med[name]:7.3f} s   "
          f"[{', '.join(f'{t:.2f}' for t in ts)}]")
  print(f"  max|x_adv - x|: jaxdefense {budget:.5f}, PyTorch {budget_t:.5f} (eps {eps:.5f})")
  print(f"  time ratio jaxdefense / PyTorch: {med['jaxdefense'] / med['PyTorch']:.2f}x   "
        f"(jaxdefense / plain JAX: {med['jaxdefense'] / med['plain JAX']:.2f}x)")
  print(f"  throughput ratio jaxdefense / PyTorch: {med['PyTorch'] / med['jaxdefense']:.2f}x")
  _roofline(model, variables, xj, yj, steps, med)
  return med


def _roofline(model, variables, x, y, steps, med):
  """Arithmetic rate of both frameworks against this machine's matrix-multiply peak.

  One PGD step is one forward and one input-gradient pass; XLA's cost analysis counts
  its floating-point operations.  The peak is PyTorch's 4096^2 single-precision matrix
  product with the same threads: no convolution runs faster than that on this CPU, so
  the attainable speed-up over the reference is bounded by ``peak / its rate``.
  """
  torch = _torch()
  loss = lambda z: optax.softmax_cross_entropy_with_integer_labels(
      model.apply(variables, z, train=False), y).mean()
  cost = jax.jit(jax.grad(loss)).lower(x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) * steps
  a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
  a @ b
  reps = []
  for _ in range(5):
    t0 = time.perf_counter()
    a @ b
    reps.append(time.perf_counter() - t0)
  peak = 2 * 2048 ** 3 / statistics.median(reps)
  if not flops:
    return
  rate = {k: flops / v / 1e9 for k, v in med.items()}
  print(f"  arithmetic: {flops / 1e9:.0f} GFLOP per attack; jaxdefense "
        f"{rate['jaxdefense']:.0f} GFLOP/s, PyTorch {rate['PyTorch']:.0f} GFLOP/s; "
        f"matrix-multiply peak {peak / 1e9:.0f} GFLOP/s")
  print(f"  largest possible throughput ratio over PyTorch on this machine: "
        f"{peak / 1e9 / rate['PyTorch']:.2f}x (PyTorch at {100e9 * rate['PyTorch'] / peak:.0f} % "
        f"of peak)")


def _digits():
  from sklearn.datasets import load_digits
  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  y = data.target.astype(np.int32)
  perm = np.random.RandomState(0).permutation(len(x))
  return x[perm[:1297]], y[perm[:1297]], x[perm[1297:]], y[perm[1297:]]


def bench_parity(args):
  torch = _torch()
  x_tr, y_tr, x_te, y_te = _digits()
  if args.quick:
    x_te, y_te = x_te[:100], y_te[:100]
  model = jd.models.create("mlp", hidden=(64, 64), num_classes=10)
  params = model.init(jax.random.key(0), jnp.asarray(x_tr[:2]))
  tx = optax.adam(3e-3)

  @jax.jit
  def train(params):
    def step(carry, _):
      p, s = carry
      g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
          model.apply(p, x_tr), y_tr).mean())(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(step, (params, tx.init(params)), None, 400)[0][0]

  params = train(params)
  logits_fn = lambda z: model.apply(params, z)

  dense = params["params"]
  layers = []
  names = sorted(dense, key=lambda n: int(n.split("_")[-1]))
  for i, name in enumerate(names):
    k, b = np.asarray(dense[name]["kernel"]), np.asarray(dense[name]["bias"])
    lin = torch.nn.Linear(k.shape[0], k.shape[1])
    lin.weight.data = torch.from_numpy(np.ascontiguousarray(k.T))
    lin.bias.data = torch.from_numpy(b.copy())
    layers.append(lin)
    if i < len(names) - 1:
      layers.append(torch.nn.ReLU())
  t_model = torch.nn.Sequential(torch.nn.Flatten(), *layers).eval()

  x_t = torch.from_numpy(np.ascontiguousarray(x_te.transpose(0, 3, 1, 2)))
  y_t = torch.from_numpy(y_te.astype(np.int64))
  acc_t = lambda z: float((t_model(z).argmax(1) == y_t).float().mean())
  acc_j = lambda z: float(np.mean(np.asarray(logits_fn(z)).argmax(1) == y_te))
  print(f"  digits MLP (64-64), {len(y_te)} test images; clean accuracy "
        f"JAX {100 * acc_j(x_te):.1f} %, PyTorch {100 * acc_t(x_t):.1f} %")
  steps = 20
  rows = []
  for eps in (0.05, 0.1):
    alpha = eps / 4
    for name, random_start in (("PGD-20 (random start)", True), ("IFGSM-20", False)):
      if random_start:
        x_adv = jd.attacks.pgd(logits_fn, x_te, y_te, key=jax.random.key(1), eps=eps,
                               step_size=alpha, steps=steps)
      else:
        x_adv = jd.attacks.ifgsm(logits_fn, x_te, y_te, eps=eps, step_size=alpha, steps=steps)
      torch.manual_seed(0)
      attack, _ = make_torch_pgd(t_model, eps, alpha, steps, random_start=random_start)
      x_adv_t = attack(x_t, y_t)
      a_j, a_t = 100 * acc_j(x_adv), 100 * acc_t(x_adv_t)
      rows.append((eps, name, a_j, a_t))
      print(f"  eps {eps:.2f} {name:22s} robust acc  JAX {a_j:5.1f} %   PyTorch {a_t:5.1f} %"
            f"   |diff| {abs(a_j - a_t):.1f} pt")
  worst = max(abs(a - b) for _, _, a, b in rows)
  print(f"  largest robust-accuracy gap: {worst:.1f} points "
        f"({'within' if worst <= 1.0 + 1e-6 else 'OUTSIDE'} 1 point)")
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small smoke run")
  parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
  parser.add_argument("--batch", type=int, default=None, help="batch size (default 128)")
  parser.add_argument("--steps", type=int, default=None, help="PGD steps (default 20)")
  parser.add_argument("--skip-speed", action="store_true")
  parser.add_argument("--skip-parity", action="store_true")
  parser.add_argument("--xla-flags", choices=("recommended", "none"), default="recommended",
                      help="install jaxdefense's recommended XLA:CPU flags (default) or keep "
                      "XLA_FLAGS as given")
  parser.add_argument("--pin-core", type=int, default=None,
                      help="run on this one CPU core (both frameworks, one thread each)")
  args = parser.parse_args(argv)
  if args.pin_core is not None:
    os.sched_setaffinity(0, {args.pin_core})  # before JAX and PyTorch size their pools
  # `import jaxdefense` (top of this file) installed the recommended XLA:CPU flags, as in
  # any plain script; "none" puts XLA_FLAGS back as given (the backend has not started).
  if args.xla_flags == "none":
    from jaxdefense import _xla_flags  # pylint: disable=import-outside-toplevel
    assert not _xla_flags.backend_started()
    if _GIVEN_XLA_FLAGS is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = _GIVEN_XLA_FLAGS
  args.repeats = args.repeats or (2 if args.quick else 5)
  args.batch = args.batch or (16 if args.quick else 128)
  args.steps = args.steps or (3 if args.quick else 20)
  torch = _torch()
  torch.set_num_threads(len(os.sched_getaffinity(0)))  # as many as XLA's pool
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); XLA_FLAGS='{os.environ.get('XLA_FLAGS', '')}'")
  if not args.skip_speed:
    print("[1] PGD speed, ResNet-20")
    bench_speed(args)
  if not args.skip_parity:
    print("[2] attack-strength parity, MLP with copied weights")
    bench_parity(args)


if __name__ == "__main__":
  main()
