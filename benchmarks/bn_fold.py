"""How much could folding batch norm into the convolutions save an attack? (issue 19.3)

An attack runs the network in evaluation mode, where each batch norm is the affine map
``x * scale + shift``.  Folding it into the neighbouring convolution (scale into the
kernel, shift into a bias) removes the multiply but keeps an add.  This benchmark
measures the most that folding (and folding the input normalisation) could ever save:
the same network with every batch norm and the normalisation *removed* (an identity,
so not even a bias add is left), against the network as it is.  The timed function is
one PGD step's arithmetic: the input gradient of the cross-entropy, jit-compiled, eval
mode, on a CIFAR-shaped batch.  The two programs run in interleaved rounds so that a
loaded machine slows them alike; medians are reported.

Run: ``python benchmarks/bn_fold.py [--batch 128] [--repeats 9] [--models resnet20,...]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxdefense as jd
from jaxdefense.nn import _layers as L


class _Identity(nn.Module):
  """Stands in for ``BatchNorm`` (same call signature), doing nothing."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return x


def _input_gradient(name: str, x: jax.Array, y: jax.Array, strip: bool):
  """The compiled ``x -> d CE / d x`` of preset ``name`` (batch norm and normalisation
  replaced by identities when ``strip``), compiled before it is returned."""
  original = L.BatchNorm
  if strip:
    L.BatchNorm = _Identity
  try:
    model = jd.models.create(name, num_classes=10,
                             normalize=None if strip else ((0.49, 0.48, 0.45),
                                                           (0.25, 0.24, 0.26)))
    variables = model.init(jax.random.PRNGKey(0), x)
    rows = jnp.arange(x.shape[0])

    def grad(x):
      return jax.grad(lambda x: -jnp.sum(jax.nn.log_softmax(model.apply(variables, x))[
          rows, y]))(x)
    fn = jax.jit(grad)
    jax.block_until_ready(fn(x))   # traced while the stand-in is installed
  finally:
    L.BatchNorm = original
  return fn


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--models", default="resnet20,preact_resnet20")
  args = parser.parse_args()
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.rand(args.batch, 32, 32, 3), jnp.float32)
  y = jnp.asarray(rng.randint(0, 10, args.batch))
  print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} "
        f"{jax.default_backend()} device(s), jax {jax.__version__}; batch {args.batch}, "
        f"medians of {args.repeats} interleaved rounds")
  print("| model | as built | BN and normalisation removed | ratio (most folding can save) |")
  print("|---|---:|---:|---:|")
  for name in args.models.split(","):
    fns = {strip: _input_gradient(name, x, y, strip) for strip in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
      for strip, fn in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(fn(x))
        times[strip].append(time.perf_counter() - t)
    full, bare = statistics.median(times[False]), statistics.median(times[True])
    print(f"| {name} | {1e3 * full:.0f} ms | {1e3 * bare:.0f} ms | {full / bare:.3f}x |")


if __name__ == "__main__":
  main()
