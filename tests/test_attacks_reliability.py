"""Attacks on a model that returns NaN / inf (issue 18, item 3) and the attacks' compile
cache (issue 19, section 2): a repeated call with the same model structure, static
hyper-parameters and shapes traces and compiles nothing."""

from __future__ import annotations

import functools
import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdefense import attacks as A
from jaxdefense import models

NUM_CLASSES = 5
SHAPE = (3, 4, 4, 1)
_W = jax.random.normal(jax.random.key(7), (16, NUM_CLASSES))
BAD = 1  # the example for which the partly broken model returns NaN


def toy(x):
  flat = x.reshape(x.shape[0], -1)
  return 4.0 * jnp.tanh(flat @ _W[: flat.shape[1]] + 0.3)


def toy_all_nan(x):
  return toy(x) * jnp.nan


def toy_one_nan(x):
  """NaN logits for bright images (example ``BAD`` of :func:`images`, whatever the
  attack does to it within its budget); each row depends on its own image only."""
  bright = jnp.sum(x, axis=(1, 2, 3)) > 9.0
  return jnp.where(bright[:, None], jnp.nan, toy(x))


def images(seed=0, shape=SHAPE):
  """Dim images (pixel sums <= 5.6) except a bright example ``BAD`` (sum >= 12): the
  budgets used here (l-inf 0.1, l2 0.5 on 16 pixels) move a sum by at most 2."""
  rng = np.random.RandomState(seed)
  x = (0.1 + 0.25 * rng.uniform(size=shape)).astype(np.float32)
  x[BAD] = 0.75 + 0.2 * rng.uniform(size=shape[1:])
  y = rng.randint(0, NUM_CLASSES, size=shape[0]).astype(np.int32)
  return x, y


def key(seed=0):
  return jax.random.key(seed, impl="rbg")  # compiles faster on CPU than threefry


@functools.lru_cache(maxsize=None)
def noisy(f):
  """A stochastic version of ``f`` (one object per ``f``, so calls can share a cache)."""
  return A.eot(lambda z, k: f(z + 0.01 * jax.random.normal(k, z.shape)), 2,
               vectorize=False)


# name -> (norm, attack(f, x, y, key, eps)) with small step counts.
ATTACKS = {
    "fgsm": ("linf", lambda f, x, y, k, e: A.fgsm(f, x, y, eps=e)),
    "ifgsm": ("linf", lambda f, x, y, k, e: A.ifgsm(f, x, y, eps=e, steps=3)),
    "pgd": ("linf", lambda f, x, y, k, e: A.pgd(f, x, y, key=k, eps=e, steps=3)),
    "pgd_restarts_l2": ("l2", lambda f, x, y, k, e: A.pgd(f, x, y, key=k, eps=e, steps=2,
                                                          norm="l2", restarts=2)),
    "pgd_eot": ("linf", lambda f, x, y, k, e: A.pgd(noisy(f), x, y, key=k, eps=e,
                                                    steps=2)),
    "mifgsm": ("linf", lambda f, x, y, k, e: A.mifgsm(f, x, y, eps=e, steps=3)),
    "cw_linf": ("linf", lambda f, x, y, k, e: A.cw_linf(f, x, y, eps=e, steps=3, lr=0.1)),
    "cw_l2": ("l2", lambda f, x, y, k, e: A.cw_l2(f, x, y, eps=e, steps=3, lr=0.1,
                                                  binary_search_steps=2)),
    "spsa": ("linf", lambda f, x, y, k, e: A.spsa(f, x, y, key=k, eps=e, steps=2,
                                                  num_samples=2)),
    "apgd": ("linf", lambda f, x, y, k, e: A.apgd(f, x, y, key=k, eps=e, steps=4,
                                                  restarts=2)),
}
# the name each attack reports in its errors and compile logs
REPORTED = {"pgd_restarts_l2": "pgd", "pgd_eot": "pgd"}


def check_budget(x_adv, x, eps, norm):
  x_adv, x = np.asarray(x_adv), np.asarray(x)
  assert np.all(np.isfinite(x_adv))
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  delta = (x_adv - x).reshape(x.shape[0], -1).astype(np.float64)
  size = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta ** 2).sum(1))
  assert np.all(size <= eps * (1 + 1e-5) + 1e-6), size


# ------------------------------------------------------------ non-finite models


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_nan_for_one_example_raises_naming_the_attack_and_the_example(name):
  x, y = images()
  _, attack = ATTACKS[name]
  pattern = (rf"^{REPORTED.get(name, name)}: the model produced non-finite \(NaN or inf\) "
             rf"logits, loss or gradient for 1 of 3 examples \(indices {BAD}\).*"
             r"Check logits_fn")
  with pytest.raises(ValueError, match=pattern):
    attack(toy_one_nan, x, y, key(0), 0.1)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_nan_for_one_example_under_jit_leaves_the_others_untouched(name):
  """Traced (no error possible): every output stays in the ball and the box, and the
  examples with finite logits get exactly the attack on the healthy model."""
  norm, attack = ATTACKS[name]
  x, y = images(1)
  eps = 0.1 if norm == "linf" else 0.5
  both = jax.jit(lambda x, y, k: (attack(toy_one_nan, x, y, k, eps),
                                  attack(toy, x, y, k, eps)))
  broken, healthy = both(x, y, key(3))
  check_budget(broken, x, eps, norm)
  keep = np.arange(x.shape[0]) != BAD
  np.testing.assert_allclose(np.asarray(broken)[keep], np.asarray(healthy)[keep],
                             rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_all_nan_model(name):
  """The issue's probe: a logits_fn that returns NaN gave all-NaN images."""
  norm, attack = ATTACKS[name]
  x, y = images(2)
  with pytest.raises(ValueError, match=r"for 3 of 3 examples \(indices 0, 1, 2\)"):
    attack(toy_all_nan, x, y, key(0), 0.1)
  out = jax.jit(lambda x, y, k: attack(toy_all_nan, x, y, k, 0.1))(x, y, key(0))
  check_budget(out, x, 0.1, norm)
  if name == "fgsm":  # the gradient at x is NaN: x is returned unchanged
    np.testing.assert_array_equal(np.asarray(out), x)


def test_an_inf_gradient_with_a_finite_loss_is_detected():
  """sqrt has an infinite derivative at 0: the loss is finite, the gradient is not."""
  x, y = images(3)
  x[2, 0, 0, 0] = 0.0  # only example 2 has a pixel at 0

  def f(z):
    return toy(z) + 1e-3 * jnp.sum(jnp.sqrt(z), axis=(1, 2, 3))[:, None] * jnp.arange(
        NUM_CLASSES, dtype=z.dtype)

  assert np.all(np.isfinite(np.asarray(f(jnp.asarray(x)))))
  with pytest.raises(ValueError, match=r"fgsm: .* for 1 of 3 examples \(indices 2\)"):
    A.fgsm(f, x, y, eps=0.1)


def test_an_example_stops_at_the_iterate_where_the_model_failed():
  """Traced: the example keeps the iterate where NaN first appeared (the last iterate
  computed from finite values), not the clean input and not a NaN."""
  x, y = images(4)
  step = 0.05
  x0 = jnp.asarray(x)

  def breaks_far_from_x(z):  # NaN once a pixel moved by more than 1.5 steps
    far = jnp.max(jnp.abs(z - x0), axis=(1, 2, 3)) > 1.5 * step
    return jnp.where(far[:, None], jnp.nan, toy(z))

  run = lambda f, steps: A.ifgsm(f, x, y, eps=0.3, step_size=step, steps=steps)
  out, two_steps = jax.jit(lambda: (run(breaks_far_from_x, 5), run(toy, 2)))()
  np.testing.assert_allclose(np.asarray(out), np.asarray(two_steps), atol=1e-7)
  assert np.all(np.abs(np.asarray(out) - x).max(axis=(1, 2, 3)) > 1.5 * step)
  with pytest.raises(ValueError, match=r"ifgsm: .* for 3 of 3 examples"):
    run(breaks_far_from_x, 5)


def test_ascent_loop_reports_and_freezes_nonfinite_examples():
  """The building block for custom attacks: per-example mask, frozen iterate."""
  x, y = images(5)
  x = jnp.asarray(x)
  vg = A.make_value_and_grad(toy_one_nan, A.make_loss("ce", jnp.asarray(y), None))
  rule = A.sign_ascent(0.05, A.make_projection("linf", x, 0.2))
  z, _, bad = A.ascent_loop(vg, rule, x, 3, None, with_nonfinite=True)
  np.testing.assert_array_equal(np.asarray(bad), np.arange(3) == BAD)
  np.testing.assert_array_equal(np.asarray(z)[BAD], np.asarray(x)[BAD])
  z2, _ = A.ascent_loop(vg, rule, x, 3, None)  # default: two outputs, same iterate
  np.testing.assert_array_equal(np.asarray(z2), np.asarray(z))
  assert np.all(np.abs(np.asarray(z) - np.asarray(x))[np.arange(3) != BAD] > 0)


# ------------------------------------------------------------------ compile cache


class CompileLog(logging.Handler):
  """Collects the names of the jitted functions JAX compiles (``jax.log_compiles``)."""

  def __init__(self):
    super().__init__(level=logging.DEBUG)
    self.names: list[str] = []

  def emit(self, record):
    m = re.match(r"Compiling (?:jit\()?([\w.<>]+)", record.getMessage())
    if m:
      self.names.append(m.group(1))


@pytest.fixture
def compile_log():
  handler = CompileLog()
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      yield handler
  finally:
    logger.removeHandler(handler)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_repeated_calls_compile_once(name, compile_log):
  """Same model, static hyper-parameters and shapes; other eps, images, labels and key:
  the second call neither traces the model nor compiles anything."""
  norm, attack = ATTACKS[name]
  traces = []

  def counted(z):
    traces.append(1)
    return toy(z)

  eps = (0.1, 0.2) if norm == "linf" else (0.5, 1.0)
  x, y = images(6)
  out1 = attack(counted, x, y, key(0), eps[0])
  first = len(traces)
  assert first >= 1
  assert REPORTED.get(name, name) in compile_log.names
  compile_log.names.clear()
  x2, y2 = images(7)
  out2 = attack(counted, x2, y2, key(1), eps[1])
  assert len(traces) == first, "the model was traced again"
  assert compile_log.names == []
  check_budget(out1, x, eps[0], norm)
  check_budget(out2, x2, eps[1], norm)


def test_eps_sweep_compiles_once_and_matches_a_traced_eps(compile_log):
  x, y = images(8, (4, 4, 4, 1))  # a shape no other test compiles pgd(toy) for
  outs = [A.pgd(toy, x, y, key=key(0), eps=e, steps=3) for e in (0.02, 0.05, 0.1)]
  assert compile_log.names.count("pgd") == 1
  traced = jax.jit(lambda e: A.pgd(toy, x, y, key=key(0), eps=e, steps=3))
  for e, out in zip((0.02, 0.05, 0.1), outs):
    np.testing.assert_allclose(np.asarray(out), np.asarray(traced(jnp.float32(e))),
                               atol=1e-7)


def test_static_hyperparameters_and_new_functions_do_compile(compile_log):
  """The counter can fail: what is static (steps, norm, loss, the function object)
  recompiles, what is traced (eps, step size) does not."""
  x, y = images(9, (2, 3, 3, 1))  # a shape no other test compiles for
  A.ifgsm(toy, x, y, eps=0.1, steps=2)
  A.ifgsm(toy, x, y, eps=0.1, steps=2, step_size=0.03)  # a new argument structure
  A.ifgsm(toy, x, y, eps=0.2, steps=2, step_size=0.01)
  assert compile_log.names.count("ifgsm") == 2
  A.ifgsm(toy, x, y, eps=0.1, steps=3)
  A.ifgsm(toy, x, y, eps=0.1, steps=2, loss="margin")
  A.ifgsm(lambda z: toy(z), x, y, eps=0.1, steps=2)
  assert compile_log.names.count("ifgsm") == 5


_TINY_TRACES = []


class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    _TINY_TRACES.append(1)
    return nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))


def test_model_variables_are_traced_not_baked_in(compile_log):
  """A ModelFn (models.bind), a functools.partial of an apply function and an EOT
  around a ModelFn are pytrees: new variables of the same shapes reuse the compiled
  attack, and the result follows the new variables."""
  module = _Tiny()
  x, y = images(10, (5, 4, 4, 1))
  v1 = module.init(jax.random.key(1), x)
  v2 = module.init(jax.random.key(2), x)
  makers = {"bind": lambda v: models.bind(module, v),
            "partial": lambda v: functools.partial(module.apply, v),
            "eot": lambda v: A.eot(models.bind(module, v), 2)}
  for name, make in makers.items():
    out1 = A.pgd(make(v1), x, y, key=key(0), eps=0.1, steps=2)
    count = len(_TINY_TRACES)
    compile_log.names.clear()
    out2 = A.pgd(make(v2), x, y, key=key(0), eps=0.1, steps=2)
    assert len(_TINY_TRACES) == count, name
    assert compile_log.names == [], name
    expected = jax.jit(lambda v: A.pgd(make(v), x, y, key=key(0), eps=0.1, steps=2))(v2)
    np.testing.assert_allclose(np.asarray(out2), np.asarray(expected), atol=1e-7)
    assert not np.allclose(np.asarray(out1), np.asarray(out2)), name


def test_an_evaluation_over_radii_compiles_each_attack_once(compile_log):
  """evaluate_robustness at a second radius (and with other variables of the same model)
  reuses every compiled attack and the compiled prediction: nothing is compiled again."""
  from jaxdefense import evaluation
  module = _Tiny()
  x, y = images(11, (6, 4, 4, 1))
  v1, v2 = module.init(jax.random.key(1), x), module.init(jax.random.key(2), x)
  suite = ["fgsm", "ifgsm:steps=3,step_size=0.01", "pgd:steps=3,step_size=0.01"]
  run = lambda v, eps: evaluation.evaluate_robustness(
      models.bind(module, v), x, y, key=key(3), eps=eps, suite=suite, batch_size=4)
  first = run(v1, 0.05)
  assert {"fgsm", "ifgsm", "pgd", "_correct"} <= set(compile_log.names)
  compile_log.names.clear()
  second = run(v1, 0.2)
  third = run(v2, 0.2)
  assert not {"fgsm", "ifgsm", "pgd", "_correct"} & set(compile_log.names), compile_log.names
  # The cached programs follow the variables they are given, not the first ones.
  for v, rep in ((v1, second), (v2, third)):
    x_adv = A.fgsm(models.bind(module, v), x, y, eps=0.2)
    want = np.mean(np.argmax(np.asarray(module.apply(v, x_adv)), -1) == np.asarray(y))
    assert rep.attacks["fgsm"] == pytest.approx(want)
  assert first.eps == 0.05 and second.eps == 0.2
