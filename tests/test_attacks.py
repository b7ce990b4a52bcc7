"""Tests of jaxdefense.attacks: invariants, exact solutions, strength, determinism, errors."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxdefense import attacks as A

NUM_CLASSES = 5
MAX_DIM = 64
SHAPES = [(2, 4, 4, 1), (3, 3, 5, 2)]
_W = jax.random.normal(jax.random.key(42), (MAX_DIM, NUM_CLASSES))


def toy_logits(x):
  """A smooth toy classifier for any image shape with at most MAX_DIM pixels."""
  flat = x.reshape(x.shape[0], -1)
  return 4.0 * jnp.tanh(flat @ _W[: flat.shape[1]] + 0.3)


def toy_noisy(x, key):
  return toy_logits(x + 0.05 * jax.random.normal(key, x.shape))


def make_images(seed, shape):
  """Images in [0, 1] that include exact 0 and 1 pixels (box edges)."""
  rng = np.random.RandomState(seed)
  x = rng.uniform(size=shape).astype(np.float32)
  x[rng.uniform(size=shape) < 0.15] = 0.0
  x[rng.uniform(size=shape) < 0.15] = 1.0
  y = rng.randint(0, NUM_CLASSES, size=shape[0]).astype(np.int32)
  return x, y


# name -> (norm, attack(x, y, key, eps)); every entry is jitted once per shape.
ATTACKS = {
    "fgsm": ("linf", lambda x, y, k, e: A.fgsm(toy_logits, x, y, eps=e)),
    "fgsm_targeted": ("linf", lambda x, y, k, e: A.fgsm(toy_logits, x, y, eps=e,
                                                        target=(y + 1) % NUM_CLASSES)),
    "ifgsm": ("linf", lambda x, y, k, e: A.ifgsm(toy_logits, x, y, eps=e, steps=3)),
    "pgd": ("linf", lambda x, y, k, e: A.pgd(toy_logits, x, y, key=k, eps=e, steps=3)),
    "pgd_l2": ("l2", lambda x, y, k, e: A.pgd(toy_logits, x, y, key=k, eps=e, steps=3,
                                              norm="l2")),
    "pgd_eot": ("linf", lambda x, y, k, e: A.pgd(A.eot(toy_noisy, 2, vectorize=False), x, y,
                                                 key=k, eps=e, steps=3, restarts=2)),
    "mifgsm": ("linf", lambda x, y, k, e: A.mifgsm(toy_logits, x, y, eps=e, steps=3)),
    "cw_linf": ("linf", lambda x, y, k, e: A.cw_linf(toy_logits, x, y, eps=e, steps=3,
                                                     lr=0.1)),
    "cw_l2": ("l2", lambda x, y, k, e: A.cw_l2(toy_logits, x, y, eps=e, steps=3, lr=0.1,
                                               c=5.0, binary_search_steps=2)),
    "spsa": ("linf", lambda x, y, k, e: A.spsa(toy_logits, x, y, key=k, eps=e, steps=3,
                                               num_samples=4, samples_per_call=2,
                                               random_start=True)),
    "apgd": ("linf", lambda x, y, k, e: A.apgd(toy_logits, x, y, key=k, eps=e, steps=5,
                                               restarts=2)),
    "apgd_t_dlr_l2": ("l2", lambda x, y, k, e: A.apgd(toy_logits, x, y, key=k, eps=e,
                                                      steps=5, norm="l2", loss="dlr",
                                                      target=(y + 1) % NUM_CLASSES)),
}


@functools.lru_cache(maxsize=None)
def jitted(name):
  return jax.jit(ATTACKS[name][1])


def rbg_key(seed):
  """Keys of the "rbg" implementation: attacks must accept any key type, and these
  compile much faster on CPU than threefry (the tests compile many small programs)."""
  return jax.random.key(seed, impl="rbg")


def check_budget(x_adv, x, eps, norm):
  x_adv, x = np.asarray(x_adv), np.asarray(x)
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  assert np.all(np.isfinite(x_adv))
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  delta = (x_adv - x).reshape(x.shape[0], -1)
  eps = np.broadcast_to(np.asarray(eps, np.float64), (x.shape[0],))
  if norm == "linf":
    size = np.abs(delta).max(axis=1)
  else:
    size = np.sqrt((delta.astype(np.float64) ** 2).sum(axis=1))
  assert np.all(size <= eps * (1 + 1e-5) + 1e-6), (size, eps)


@pytest.mark.parametrize("name", sorted(ATTACKS))
@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), shape=st.sampled_from(SHAPES),
       frac=st.floats(0.0, 1.0), key_seed=st.integers(0, 1000))
def test_budget_and_box(name, seed, shape, frac, key_seed):
  norm = ATTACKS[name][0]
  eps = frac * (0.3 if norm == "linf" else 2.0)
  x, y = make_images(seed, shape)
  x_adv = jitted(name)(x, y, rbg_key(key_seed), jnp.float32(eps))
  check_budget(x_adv, x, np.float32(eps), norm)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_eps_zero_returns_input(name):
  for shape in SHAPES:
    x, y = make_images(7, shape)
    x_adv = jitted(name)(x, y, rbg_key(0), jnp.float32(0.0))
    np.testing.assert_array_equal(np.asarray(x_adv), x)


def test_eps_zero_eager():
  x, y = make_images(3, SHAPES[0])
  np.testing.assert_array_equal(np.asarray(A.fgsm(toy_logits, x, y, eps=0)), x)
  np.testing.assert_array_equal(np.asarray(A.ifgsm(toy_logits, x, y, eps=0.0, steps=2)), x)


def test_per_example_eps():
  x, y = make_images(11, (3, 4, 4, 1))
  eps = jnp.array([0.0, 0.05, 0.2], jnp.float32)
  for norm in ("linf", "l2"):
    x_adv = jax.jit(lambda x, y, e: A.pgd(toy_logits, x, y, key=rbg_key(0), eps=e,
                                          steps=3, norm=norm))(x, y, eps)
    check_budget(x_adv, x, eps, norm)
    np.testing.assert_array_equal(np.asarray(x_adv)[0], x[0])


# ----------------------------------------------------------------- exact solutions


def _linear(num_classes, dim=16, seed=0):
  kw, kb = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(kw, (dim, num_classes))
  b = jax.random.normal(kb, (num_classes,))
  return w, b, lambda x: x.reshape(x.shape[0], -1) @ w + b


def test_fgsm_binary_linear_is_sign_of_weight_difference():
  w, _, f = _linear(2)
  rng = np.random.RandomState(0)
  x = rng.uniform(0.3, 0.7, size=(6, 4, 4, 1)).astype(np.float32)
  y = rng.randint(0, 2, size=6).astype(np.int32)
  eps = 0.05
  x_adv = np.asarray(A.fgsm(f, x, y, eps=eps))
  w = np.asarray(w)
  direction = np.sign(w[:, 1 - y] - w[:, y]).T.reshape(x.shape)
  np.testing.assert_array_equal(x_adv, x + np.float32(eps) * direction)


def test_fgsm_multiclass_linear_matches_analytic_gradient():
  w, b, f = _linear(4, seed=1)
  rng = np.random.RandomState(1)
  x = rng.uniform(0.3, 0.7, size=(5, 4, 4, 1)).astype(np.float32)
  y = rng.randint(0, 4, size=5).astype(np.int32)
  t = ((y + 1) % 4).astype(np.int32)
  eps = np.float32(0.04)
  w = np.asarray(w, np.float64)
  logits = x.reshape(5, -1).astype(np.float64) @ w + np.asarray(b)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  onehot = lambda labels: np.eye(4)[labels]
  # Untargeted CE: grad = W (p - e_y).
  grad = (p - onehot(y)) @ w.T
  np.testing.assert_array_equal(np.asarray(A.fgsm(f, x, y, eps=eps)),
                                x + eps * np.sign(grad).reshape(x.shape).astype(np.float32))
  # Targeted CE: descend CE(t), i.e. ascend W (e_t - p).
  grad_t = (onehot(t) - p) @ w.T
  np.testing.assert_array_equal(np.asarray(A.fgsm(f, x, y, eps=eps, target=t)),
                                x + eps * np.sign(grad_t).reshape(x.shape).astype(np.float32))
  # Margin loss: grad = W_{j*} - W_y with j* the runner-up class.
  masked = np.where(onehot(y) > 0, -np.inf, logits)
  runner = masked.argmax(1)
  grad_m = (w[:, runner] - w[:, y]).T
  np.testing.assert_array_equal(np.asarray(A.fgsm(f, x, y, eps=eps, loss="margin")),
                                x + eps * np.sign(grad_m).reshape(x.shape).astype(np.float32))


def test_fgsm_clips_to_box():
  _, _, f = _linear(3, seed=2)
  x = np.zeros((2, 4, 4, 1), np.float32)
  x[1] = 1.0
  y = np.array([0, 1], np.int32)
  x_adv = np.asarray(A.fgsm(f, x, y, eps=0.1))
  assert set(np.unique(x_adv[0])) <= {0.0, np.float32(0.1)}
  assert set(np.unique(x_adv[1])) <= {1.0, np.float32(0.9)}


def test_ifgsm_single_step_equals_fgsm():
  x, y = make_images(5, SHAPES[0])
  np.testing.assert_array_equal(
      np.asarray(A.ifgsm(toy_logits, x, y, eps=0.1, step_size=0.1, steps=1)),
      np.asarray(A.fgsm(toy_logits, x, y, eps=0.1)))


def test_apgd_checkpoints_follow_the_paper():
  assert A.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
  assert all(0 < w < 10 for w in A.apgd_checkpoints(10))


def test_dlr_is_shift_and_scale_invariant():
  z = jax.random.normal(jax.random.key(0), (4, 6))
  y = jnp.array([0, 1, 2, 3])
  np.testing.assert_allclose(A.dlr(z, y), A.dlr(3.0 * z + 1.5, y), rtol=1e-5, atol=1e-6)
  t = (y + 1) % 6
  np.testing.assert_allclose(A.dlr_targeted(z, y, t), A.dlr_targeted(2.0 * z - 1.0, y, t),
                             rtol=1e-5, atol=1e-6)
  # Positive DLR <=> misclassified.
  np.testing.assert_array_equal(np.asarray(A.dlr(z, y) > 0), np.asarray(z.argmax(1) != y))


# --------------------------------------------------------------- jit / loops / keys


def _count_eqns(jaxpr):
  total = 0
  for eqn in jaxpr.eqns:
    total += 1
    for param in eqn.params.values():
      for p in (param if isinstance(param, (tuple, list)) else [param]):
        inner = getattr(p, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          total += _count_eqns(inner)
        elif hasattr(p, "eqns"):
          total += _count_eqns(p)
  return total


LOOP_ATTACKS = {
    "ifgsm": lambda f, x, y, s: A.ifgsm(f, x, y, eps=0.1, steps=s),
    "pgd": lambda f, x, y, s: A.pgd(f, x, y, key=jax.random.key(0), eps=0.1, steps=s),
    "mifgsm": lambda f, x, y, s: A.mifgsm(f, x, y, eps=0.1, steps=s),
    "cw_linf": lambda f, x, y, s: A.cw_linf(f, x, y, eps=0.1, steps=s),
    "cw_l2": lambda f, x, y, s: A.cw_l2(f, x, y, steps=s),
    "spsa": lambda f, x, y, s: A.spsa(f, x, y, key=jax.random.key(0), eps=0.1, steps=s,
                                      num_samples=2),
    "apgd": lambda f, x, y, s: A.apgd(f, x, y, key=jax.random.key(0), eps=0.1, steps=s),
}


@pytest.mark.parametrize("name", sorted(LOOP_ATTACKS))
def test_program_size_does_not_grow_with_steps(name):
  x, y = make_images(0, SHAPES[0])
  sizes = []
  for steps in (3, 60):
    traces = []

    def counted(z, traces=traces):
      traces.append(1)
      return toy_logits(z)

    jaxpr = jax.make_jaxpr(lambda x: LOOP_ATTACKS[name](counted, x, y, steps))(x)
    sizes.append((_count_eqns(jaxpr.jaxpr), len(traces)))
  assert sizes[0] == sizes[1], sizes
  assert sizes[0][1] <= 4  # the model is traced a fixed number of times


def test_no_retrace_across_calls():
  traces = []

  @jax.jit
  def attack(x, y, key, eps):
    traces.append(1)
    return A.pgd(toy_logits, x, y, key=key, eps=eps, steps=3)

  x, y = make_images(0, SHAPES[0])
  attack(x, y, rbg_key(0), jnp.float32(0.1))
  x2, y2 = make_images(1, SHAPES[0])
  attack(x2, y2, rbg_key(1), jnp.float32(0.2))
  assert len(traces) == 1


@pytest.mark.parametrize("name", ["pgd", "spsa", "apgd", "pgd_eot", "apgd_t_dlr_l2"])
def test_deterministic_for_a_key(name):
  x, y = make_images(2, SHAPES[1])
  fn = jitted(name)
  a = fn(x, y, rbg_key(3), jnp.float32(0.1))
  b = fn(x, y, rbg_key(3), jnp.float32(0.1))
  c = fn(x, y, rbg_key(4), jnp.float32(0.1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_raw_uint32_keys_work():
  x, y = make_images(2, SHAPES[0])
  a = A.pgd(toy_logits, x, y, key=jax.random.PRNGKey(0), eps=0.1, steps=1)
  check_budget(a, x, 0.1, "linf")


def test_vmap_over_keys_and_examples():
  x, y = make_images(4, (3, 4, 4, 1))
  run = jax.jit(lambda xs, ys, k: A.pgd(toy_logits, xs, ys, key=k, eps=0.1, steps=2))
  keys = jax.random.split(jax.random.key(0), 2)  # threefry: vmap-invariant
  batched = jax.jit(jax.vmap(run, in_axes=(None, None, 0)))(x, y, keys)
  for i in range(2):
    np.testing.assert_allclose(batched[i], run(x, y, keys[i]), atol=1e-6)
  one = jax.jit(lambda xs, ys: A.mifgsm(toy_logits, xs, ys, eps=0.1, steps=3))
  per_example = jax.jit(jax.vmap(lambda xi, yi: one(xi[None], yi[None])[0]))(x, y)
  for i in range(3):
    np.testing.assert_allclose(per_example[i], one(x[i:i + 1], y[i:i + 1])[0], atol=1e-6)


def test_examples_are_independent():
  """An example's result does not depend on the rest of the batch (no random start)."""
  x, y = make_images(9, (4, 4, 4, 1))
  full = np.asarray(A.ifgsm(toy_logits, x, y, eps=0.1, steps=5))
  part = np.asarray(A.ifgsm(toy_logits, x[:2], y[:2], eps=0.1, steps=5))
  np.testing.assert_allclose(full[:2], part, atol=1e-6)


# ----------------------------------------------------------------- trained model


def _mlp(params, x):
  h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


@functools.partial(jax.jit, static_argnames=("steps", "hidden"))
def _train_mlp_jit(x, y, key, steps=200, hidden=32):
  k1, k2 = jax.random.split(key)
  params = {"w1": jax.random.normal(k1, (64, hidden)) / 8, "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, 10)) / np.sqrt(hidden),
            "b2": jnp.zeros(10)}
  tx = optax.adam(1e-2)

  def step(carry, _):
    p, s = carry
    g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        _mlp(p, x), y).mean())(p)
    updates, s = tx.update(g, s, p)
    return (optax.apply_updates(p, updates), s), None

  return jax.lax.scan(step, (params, tx.init(params)), None, steps)[0][0]


def _train_mlp(x, y, seed):
  """A 64-32-10 ReLU MLP trained with Adam (one compilation for every seed)."""
  return _train_mlp_jit(x, y, jax.random.key(seed))


@pytest.fixture(scope="module")
def digits():
  from sklearn.datasets import load_digits
  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  y = data.target.astype(np.int32)
  perm = np.random.RandomState(0).permutation(len(x))
  train, test = perm[:1400], perm[1400:1600]
  params = _train_mlp(jnp.asarray(x[train]), jnp.asarray(y[train]), seed=0)
  model = jax.jit(functools.partial(_mlp, params))
  return {"x": x[test], "y": y[test], "f": model, "params": params,
          "train": (x[train], y[train])}


def _acc(f, x, y):
  return float(np.mean(np.asarray(f(jnp.asarray(x))).argmax(1) == y))


def test_trained_model_is_accurate(digits):
  assert _acc(digits["f"], digits["x"], digits["y"]) > 0.9


def test_attack_strength_ordering(digits):
  f, x, y = digits["f"], digits["x"], digits["y"]
  eps, key = 0.1, rbg_key(0)
  clean = _acc(f, x, y)
  acc = {
      "fgsm": _acc(f, A.fgsm(f, x, y, eps=eps), y),
      "pgd": _acc(f, A.pgd(f, x, y, key=key, eps=eps, step_size=eps / 4, steps=20), y),
      "apgd": _acc(f, A.apgd(f, x, y, key=key, eps=eps, steps=20), y),
      "mifgsm": _acc(f, A.mifgsm(f, x, y, eps=eps), y),
  }
  assert acc["fgsm"] < clean - 0.3, acc
  assert acc["pgd"] <= acc["fgsm"], acc
  assert acc["mifgsm"] <= acc["fgsm"] + 0.02, acc
  assert acc["apgd"] <= acc["pgd"] + 0.03, acc


def test_pgd_restarts_never_weaker(digits):
  f, x, y = digits["f"], digits["x"][:100], digits["y"][:100]
  key = rbg_key(1)
  one = A.pgd(f, x, y, key=key, eps=0.08, steps=5)
  many = A.pgd(f, x, y, key=key, eps=0.08, steps=5, restarts=3)
  fooled_one = np.asarray(f(one)).argmax(1) != y
  fooled_many = np.asarray(f(many)).argmax(1) != y
  assert np.all(fooled_many >= fooled_one)


def test_pgd_l2_and_cw_lower_accuracy(digits):
  f, x, y = digits["f"], digits["x"], digits["y"]
  clean = _acc(f, x, y)
  assert _acc(f, A.pgd(f, x, y, key=rbg_key(0), eps=1.5, norm="l2", steps=10),
              y) < clean - 0.3
  # tanh-space C&W cannot move pixels sitting at exactly 0 or 1; shrink the range.
  xi = 0.05 + 0.9 * x
  assert _acc(f, A.cw_linf(f, xi, y, eps=0.1, lr=0.01), y) < _acc(f, xi, y) - 0.3
  x_l2 = A.cw_l2(f, xi[:50], y[:50], c=10.0, steps=50, binary_search_steps=2)
  assert _acc(f, x_l2, y[:50]) < 0.5


def test_cw_linf_paper_defaults_decrease_objective(digits):
  f, x, y = digits["f"], 0.05 + 0.9 * digits["x"][:50], digits["y"][:50]
  x_adv = A.cw_linf(f, x, y, eps=8 / 255)
  m = lambda z: np.asarray(A.margin(f(z), jnp.asarray(y)))
  assert np.mean(m(x_adv)) > np.mean(m(x))


def test_spsa_lowers_accuracy(digits):
  f, x, y = digits["f"], digits["x"][:100], digits["y"][:100]
  x_adv = A.spsa(f, x, y, key=rbg_key(0), eps=0.1, steps=30, num_samples=32)
  check_budget(x_adv, x, 0.1, "linf")
  assert _acc(f, x_adv, y) < _acc(f, x, y) - 0.3


def test_targeted_attacks_hit_target(digits):
  f, x, y = digits["f"], digits["x"], digits["y"]
  t = ((y + 1 + np.random.RandomState(0).randint(0, 9, size=y.shape)) % 10).astype(np.int32)
  key, eps = rbg_key(2), 0.15
  hit = lambda xa: float(np.mean(np.asarray(f(xa)).argmax(1) == t))
  rates = {
      "pgd": hit(A.pgd(f, x, y, key=key, eps=eps, steps=20, target=t)),
      "apgd_t": hit(A.apgd(f, x, y, key=key, eps=eps, steps=20, loss="dlr", target=t)),
      "cw_linf": hit(A.cw_linf(f, 0.05 + 0.9 * x, y, eps=eps, lr=0.01, target=t)),
  }
  assert all(r > 0.25 for r in rates.values()), rates  # chance is 0.1


def _noisy_digits(params, sigma=1.0):
  def noisy(x, key):
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    h = h * (1.0 + sigma * jax.random.normal(key, h.shape))
    return h @ params["w2"] + params["b2"]
  return noisy


def test_eot_stronger_than_single_draw(digits):
  noisy = _noisy_digits(digits["params"])
  x, y = digits["x"], digits["y"]
  judge = A.eot(noisy, 64)
  acc = lambda xa: float(np.mean(np.asarray(judge(jnp.asarray(xa), rbg_key(99)))
                                 .argmax(1) == y))
  key = rbg_key(3)
  single = acc(A.fgsm(A.eot(noisy, 1), x, y, key=key, eps=0.1))
  averaged = acc(A.fgsm(A.eot(noisy, 16), x, y, key=key, eps=0.1))
  assert averaged < single - 0.05, (single, averaged)


def test_eot_is_a_no_op_on_deterministic_models(digits):
  f, x, y = digits["f"], digits["x"][:40], digits["y"][:40]
  wrapped = A.eot(lambda z, k: f(z), 4)
  key = rbg_key(0)
  attack = functools.partial(A.ifgsm, key=key, eps=0.1, steps=5)
  np.testing.assert_allclose(attack(wrapped, x, y), attack(f, x, y), atol=1e-6)
  np.testing.assert_allclose(A.predict(wrapped, x, key=key), f(x), rtol=1e-6, atol=1e-6)


def test_transfer_attack(digits):
  oracle, x, y = digits["f"], digits["x"], digits["y"]
  tx, ty = digits["train"]
  target_params = _train_mlp(jnp.asarray(tx), jnp.asarray(ty), seed=1)
  target = functools.partial(_mlp, target_params)
  res = A.transfer(A.ifgsm, oracle, target, x, y, key=rbg_key(0), eps=0.15, steps=10)
  check_budget(res.x_adv, x, 0.15, "linf")
  np.testing.assert_allclose(res.target_logits, target(res.x_adv), atol=1e-5)
  np.testing.assert_allclose(res.oracle_logits, oracle(res.x_adv), atol=1e-5)
  white_box = float(np.mean(np.asarray(res.oracle_logits).argmax(1) == y))
  blind = float(np.mean(np.asarray(res.target_logits).argmax(1) == y))
  assert white_box < blind < _acc(target, x, y)
  # A stochastic target model is evaluated through EOT with a derived key.
  noisy = A.eot(_noisy_digits(target_params, 0.1), 4)
  res2 = A.transfer(A.pgd, oracle, noisy, x, y, key=rbg_key(1), eps=0.15, steps=5)
  assert res2.target_logits.shape == (len(y), 10)


# ------------------------------------------------------------------------ errors


def _bad_cases():
  x, y = make_images(0, SHAPES[0])
  f, k = toy_logits, rbg_key(0)
  return [
      ("negative eps", lambda: A.pgd(f, x, y, key=k, eps=-0.1), ValueError, r"eps.*>= 0"),
      ("255-scale eps", lambda: A.fgsm(f, x, y, eps=8), ValueError, r"eps.*8/255"),
      ("nan eps", lambda: A.fgsm(f, x, y, eps=float("nan")), ValueError, r"eps.*finite"),
      ("eps shape", lambda: A.fgsm(f, x, y, eps=np.ones(5, np.float32) * 0.1), ValueError,
       r"eps.*one value per example"),
      ("zero steps", lambda: A.pgd(f, x, y, key=k, eps=0.1, steps=0), ValueError,
       r"steps must be >= 1"),
      ("float steps", lambda: A.ifgsm(f, x, y, eps=0.1, steps=2.5), TypeError,
       r"steps must be an integer"),
      ("zero restarts", lambda: A.pgd(f, x, y, key=k, eps=0.1, restarts=0), ValueError,
       r"restarts"),
      ("negative step", lambda: A.pgd(f, x, y, key=k, eps=0.1, step_size=-1.0), ValueError,
       r"step_size.*>= 0"),
      ("rank 3 images", lambda: A.fgsm(f, x[0], y, eps=0.1), ValueError, r"x must have rank 4"),
      ("255 images", lambda: A.fgsm(f, x * 255, y, eps=0.1), ValueError, r"\[0, 1\].*255"),
      ("nan images", lambda: A.fgsm(f, np.full_like(x, np.nan), y, eps=0.1), ValueError,
       r"NaN"),
      ("int images", lambda: A.fgsm(f, (x * 255).astype(np.uint8), y, eps=0.1), TypeError,
       r"floating"),
      ("label range", lambda: A.fgsm(f, x, y + NUM_CLASSES, eps=0.1), ValueError,
       r"y must lie in \[0, 5\)"),
      ("label batch", lambda: A.fgsm(f, x, y[:1], eps=0.1), ValueError, r"one label per image"),
      ("float labels", lambda: A.fgsm(f, x, y.astype(np.float32), eps=0.1), TypeError,
       r"integer class labels"),
      ("target range", lambda: A.pgd(f, x, y, key=k, eps=0.1, target=y + 9), ValueError,
       r"target must lie"),
      ("norm", lambda: A.pgd(f, x, y, key=k, eps=0.1, norm="l1"), ValueError, r"norm"),
      ("loss", lambda: A.pgd(f, x, y, key=k, eps=0.1, loss="hinge"), ValueError, r"loss"),
      ("no key", lambda: A.pgd(f, x, y, key=None, eps=0.1), ValueError, r"key is required"),
      ("int key", lambda: A.pgd(f, x, y, key=0, eps=0.1), TypeError, r"PRNG key"),
      ("eot without key", lambda: A.fgsm(A.eot(toy_noisy, 2), x, y, eps=0.1), ValueError,
       r"key is required"),
      ("stochastic without eot", lambda: A.fgsm(toy_noisy, x, y, eps=0.1), TypeError,
       r"eot\(f, n\)"),
      ("bad logits shape", lambda: A.fgsm(lambda z: z, x, y, eps=0.1), ValueError,
       r"logits \[B, K\]"),
      ("dlr needs classes", lambda: A.apgd(lambda z: toy_logits(z)[:, :2], x, y % 2, key=k,
                                           eps=0.1, loss="dlr"), ValueError, r"at least 3"),
      ("eot n", lambda: A.eot(toy_noisy, 0), ValueError, r"n must be >= 1"),
      ("not callable", lambda: A.fgsm("model", x, y, eps=0.1), TypeError, r"callable"),
      ("spsa chunks", lambda: A.spsa(f, x, y, key=k, eps=0.1, num_samples=6,
                                     samples_per_call=4), ValueError, r"divide"),
      ("spsa delta", lambda: A.spsa(f, x, y, key=k, eps=0.1, delta=0.0), ValueError,
       r"delta must be > 0"),
      ("apgd rho", lambda: A.apgd(f, x, y, key=k, eps=0.1, rho=1.5), ValueError, r"rho"),
      ("l2 eps too big", lambda: A.pgd(f, x, y, key=k, eps=100.0, norm="l2"), ValueError,
       r"eps must be <= 4"),
      ("cw c", lambda: A.cw_linf(f, x, y, eps=0.1, c=-1.0), ValueError, r"c must be >= 0"),
  ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs_raise_clear_errors(case):
  _, call, exc, pattern = case
  with pytest.raises(exc, match=pattern):
    call()


def test_value_checks_are_skipped_under_jit():
  x, y = make_images(0, SHAPES[0])
  # Values are not inspected on tracers (no host sync); shapes still are.
  out = jax.jit(lambda x: A.fgsm(toy_logits, x, y, eps=0.1))(x)
  check_budget(out, x, 0.1, "linf")
  with pytest.raises(ValueError, match=re.escape("rank 4")):
    jax.jit(lambda x: A.fgsm(toy_logits, x, y, eps=0.1))(x[0])


@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgd_l2", "pgd_eot", "mifgsm", "cw_linf",
                                  "cw_l2", "spsa", "apgd", "apgd_t_dlr_l2"])
def test_attacks_accept_a_batch_sharded_over_an_explicit_mesh(name):
  """A batch laid out with explicit sharding (jax.make_mesh's axis type for users who
  shard data themselves) is attacked as it is, and gives the unsharded result."""
  if not hasattr(jax.sharding, "AxisType"):
    pytest.skip("explicit sharding needs a newer JAX")
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((1,), ("batch",), axis_types=(AxisType.Explicit,))
  norm, attack = ATTACKS[name]
  x, y = make_images(3, SHAPES[1])
  key = rbg_key(5)
  expected = jitted(name)(x, y, key, 0.1)
  sharding = NamedSharding(mesh, P("batch"))
  xs, ys = jax.device_put(x, sharding), jax.device_put(y, sharding)
  x_adv = jax.jit(attack)(xs, ys, key, 0.1)
  assert x_adv.sharding.spec[0] == "batch"
  check_budget(x_adv, x, 0.1, norm)
  np.testing.assert_allclose(np.asarray(x_adv), np.asarray(expected), rtol=1e-5, atol=1e-6)


# ------------------------------------------------- per-example hyper-parameters


def _rgb_batch():
  """Three RGB images: B == C == 3, so a [B] value wrongly aligned with the channel
  axis broadcasts silently instead of failing."""
  x, _ = make_images(21, (3, 4, 4, 3))
  x = 0.1 + 0.8 * x  # away from the box edges, where tanh-space C&W cannot move
  y = np.asarray(toy_logits(jnp.asarray(x)).argmax(1)).astype(np.int32)
  return x, y


PER_EXAMPLE_PARAMS = {
    "mifgsm mu": ([0.0, 0.5, 3.0], lambda x, y, v: A.mifgsm(
        toy_logits, x, y, eps=0.2, steps=6, step_size=0.05, mu=v)),
    "cw_linf lr": ([0.01, 0.05, 0.2], lambda x, y, v: A.cw_linf(
        toy_logits, x, y, eps=0.2, steps=6, lr=v)),
    "cw_l2 lr": ([0.01, 0.05, 0.2], lambda x, y, v: A.cw_l2(
        toy_logits, x, y, c=5.0, steps=6, lr=v)),
    "spsa lr": ([0.005, 0.02, 0.1], lambda x, y, v: A.spsa(
        toy_logits, x, y, key=rbg_key(0), eps=0.2, steps=4, lr=v, num_samples=4)),
}


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE_PARAMS))
def test_per_example_hyperparameter_matches_scalar_runs(name):
  """Row b of a run with a per-example value [B] equals row b of the run with the
  scalar value[b] (the value is broadcast over the batch axis, not the channels)."""
  values, attack = PER_EXAMPLE_PARAMS[name]
  x, y = _rgb_batch()
  per_example = np.asarray(attack(x, y, jnp.asarray(values, jnp.float32)))
  for b, value in enumerate(values):
    scalar = np.asarray(attack(x, y, value))
    np.testing.assert_allclose(per_example[b], scalar[b], rtol=1e-5, atol=1e-6,
                               err_msg=f"{name}: row {b} (value {value})")
  # The values matter: the rows do not all equal the run with values[0].
  assert not np.allclose(per_example, np.asarray(attack(x, y, values[0])), atol=1e-6)


def test_list_hyperparameters_are_checked_and_work_like_arrays():
  x, y = make_images(0, SHAPES[0])  # a batch of 2
  k = rbg_key(0)
  with pytest.raises(ValueError, match=r"fgsm: eps must be a scalar or have one value per "
                                       r"example \(shape \(2,\)\)"):
    A.fgsm(toy_logits, x, y, eps=[0.1] * 5)
  with pytest.raises(ValueError, match=r"mifgsm: mu .*one value per example"):
    A.mifgsm(toy_logits, x, y, eps=0.1, mu=[0.5, 0.5, 0.5])
  with pytest.raises(ValueError, match=r"spsa: lr .*one value per example"):
    A.spsa(toy_logits, x, y, key=k, eps=0.1, lr=[0.01] * 3)
  cases = [
      (lambda e: A.fgsm(toy_logits, x, y, eps=e), [0.05, 0.2]),
      (lambda e: A.mifgsm(toy_logits, x, y, eps=e, steps=3), [0.05, 0.2]),
      (lambda e: A.mifgsm(toy_logits, x, y, eps=0.1, steps=3, mu=e), [0.0, 2.0]),
      (lambda e: A.apgd(toy_logits, x, y, key=k, eps=e, steps=3), [0.05, 0.2]),
      (lambda e: A.cw_linf(toy_logits, x, y, eps=0.1, steps=3, lr=0.1, kappa=e), [0.0, 1.0]),
      (lambda e: A.spsa(toy_logits, x, y, key=k, eps=0.1, steps=2, num_samples=2, delta=e),
       [0.01, 0.05]),
  ]
  for attack, value in cases:
    np.testing.assert_array_equal(np.asarray(attack(value)),
                                  np.asarray(attack(np.asarray(value, np.float32))))


# ------------------------------------------------------------- C&W l2: kappa, c


def _cw_linear():
  w = jax.random.normal(jax.random.key(1), (16, 5))
  f = lambda x: x.reshape(x.shape[0], -1) @ w
  x = np.random.RandomState(0).uniform(0.2, 0.8, size=(8, 4, 4, 1)).astype(np.float32)
  y = np.asarray(f(x).argmax(1)).astype(np.int32)
  return f, x, y


def test_cw_l2_returns_examples_with_kappa_confidence():
  """C&W count an iterate as successful only with margin >= kappa."""
  f, x, y = _cw_linear()
  margin_of = lambda xa: np.asarray(A.margin(f(jnp.asarray(xa)), jnp.asarray(y)))
  plain = margin_of(A.cw_l2(f, x, y, c=10.0, kappa=0.0, steps=300, lr=0.01))
  confident = margin_of(A.cw_l2(f, x, y, c=10.0, kappa=5.0, steps=300, lr=0.01))
  assert np.all(plain > 0) and np.all(plain < 1.0), plain  # just across the boundary
  assert np.all(confident >= 5.0 - 1e-3), confident
  # Targeted: z_t - max_{i != t} z_i >= kappa.
  t = ((y + 1) % 5).astype(np.int32)
  x_t = A.cw_l2(f, x, y, c=100.0, kappa=2.0, steps=200, lr=0.05, target=t)
  assert np.all(-np.asarray(A.margin(f(x_t), jnp.asarray(t))) >= 2.0 - 1e-3)


def test_cw_l2_search_lowers_c_after_every_successful_run():
  """A successful run lowers c even when it does not beat the distance of earlier runs.

  With c = 2^28 the distance term is below the float32 rounding of the gradient, and
  Adam is invariant to the scale of the gradient, so the runs at c = 2^28, 2^27, ...
  follow the same iterates and none beats the previous best distance.  The search must
  still halve c after each of them, down to values where the distance term matters
  and the l2-minimal perturbation is found; had it counted "beat the best distance"
  as success, it would raise c again and stay on the first run's larger perturbation.
  """
  batch = 9
  rng = np.random.RandomState(0)
  s = (rng.choice([-1.0, 1.0], size=16) * rng.uniform(0.5, 2.0, size=16)).astype(np.float32)
  x = rng.uniform(0.3, 0.7, size=(batch, 4, 4, 1)).astype(np.float32)
  gap = np.linspace(0.4, 1.6, batch).astype(np.float32)
  gap[-1] = -1.0  # the last example is already misclassified at x
  bias = -(x.reshape(batch, -1) @ s) - gap

  def f(z):  # binary linear model; class 1 wins iff s . z + bias > 0
    m = z.reshape(z.shape[0], -1) @ s + bias
    return jnp.stack([jnp.zeros_like(m), m], axis=1)

  y = np.zeros(batch, np.int32)
  dist = lambda xa: np.sqrt(((np.asarray(xa) - x) ** 2).reshape(batch, -1).sum(1))
  optimum = gap[:-1] / np.linalg.norm(s)  # exact minimal l2 distance to the boundary
  run = lambda n: A.cw_l2(f, x, y, c=2.0**28, steps=50, lr=0.01, binary_search_steps=n)
  single, searched = run(1), run(40)
  for xa in (single, searched):
    assert np.all(np.asarray(f(xa)).argmax(1) == 1)  # every example fooled
  assert dist(searched)[-1] < 1e-3  # the misclassified example stays (almost) at x
  assert np.all(dist(searched) <= dist(single) + 1e-6)
  ratio = dist(searched)[:-1] / optimum
  assert np.all(ratio < 1.02), ratio
  assert np.max(dist(single)[:-1] / optimum) > 1.05  # the first run alone is not optimal


# ------------------------------------------------------------------------ precision


def _bf16_logits(x):
  """toy_logits computed in bfloat16 (a mixed-precision model on float32 images)."""
  flat = x.reshape(x.shape[0], -1).astype(jnp.bfloat16)
  return 4.0 * jnp.tanh(flat @ _W[: flat.shape[1]].astype(jnp.bfloat16) + 0.3)


def _bf16_noisy(x, key):
  return _bf16_logits(x + 0.05 * jax.random.normal(key, x.shape))


BF16_ATTACKS = {
    "fgsm": ("linf", lambda f, x, y, k: A.fgsm(f, x, y, eps=0.1)),
    "ifgsm": ("linf", lambda f, x, y, k: A.ifgsm(f, x, y, eps=0.1, steps=2)),
    "pgd_restarts": ("linf", lambda f, x, y, k: A.pgd(f, x, y, key=k, eps=0.1, steps=2,
                                                      restarts=2)),
    "pgd_eot": ("linf", lambda f, x, y, k: A.pgd(A.eot(_bf16_noisy, 2), x, y, key=k,
                                                 eps=0.1, steps=2, restarts=2)),
    "mifgsm": ("linf", lambda f, x, y, k: A.mifgsm(f, x, y, eps=0.1, steps=2)),
    "cw_linf": ("linf", lambda f, x, y, k: A.cw_linf(f, x, y, eps=0.1, steps=2, lr=0.1)),
    "cw_l2": ("l2", lambda f, x, y, k: A.cw_l2(f, x, y, eps=0.5, steps=2, lr=0.1,
                                               binary_search_steps=2)),
    "spsa": ("linf", lambda f, x, y, k: A.spsa(f, x, y, key=k, eps=0.1, steps=2,
                                               num_samples=2)),
    "spsa_eot": ("linf", lambda f, x, y, k: A.spsa(A.eot(_bf16_noisy, 2), x, y, key=k,
                                                   eps=0.1, steps=2, num_samples=2)),
    "apgd_ce": ("linf", lambda f, x, y, k: A.apgd(f, x, y, key=k, eps=0.1, steps=3,
                                                  restarts=2)),
    "apgd_dlr_l2": ("l2", lambda f, x, y, k: A.apgd(f, x, y, key=k, eps=0.5, steps=3,
                                                    norm="l2", loss="dlr")),
}


@pytest.mark.parametrize("name", sorted(BF16_ATTACKS))
def test_attacks_run_on_a_model_with_bfloat16_logits(name):
  """float32 images, bfloat16 logits: the loops' states do not depend on the logits'
  dtype (losses are float32), and the result keeps the images' dtype and budget."""
  norm, attack = BF16_ATTACKS[name]
  x, y = make_images(5, SHAPES[0])
  x_adv = attack(_bf16_logits, x, y, rbg_key(0))
  check_budget(x_adv, x, 0.1 if norm == "linf" else 0.5, norm)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_images_are_rejected_clearly(dtype):
  x, y = make_images(0, SHAPES[0])
  x_low = jnp.asarray(x, dtype)
  pattern = (r"x must hold float32 or float64 images; got array of shape \(2, 4, 4, 1\) "
             rf"and dtype {jnp.dtype(dtype).name}\..*x\.astype\(jnp\.float32\)")
  for call in (lambda: A.fgsm(toy_logits, x_low, y, eps=0.1),
               lambda: A.pgd(toy_logits, x_low, y, key=rbg_key(0), eps=0.1),
               lambda: A.cw_l2(toy_logits, x_low, y),
               lambda: A.spsa(toy_logits, x_low, y, key=rbg_key(0), eps=0.1)):
    with pytest.raises(ValueError, match=pattern):
      call()


# ----------------------------------------------------------- SPSA on noisy models


def _noisy_binary(sigma=10.0):
  """A binary linear model plus large additive noise that does not depend on x."""
  s = jax.random.normal(jax.random.key(3), (16,))

  def clean(x):
    m = x.reshape(x.shape[0], -1) @ s + 0.2
    return jnp.stack([jnp.zeros_like(m), m], axis=1)

  def noisy(x, key):
    return clean(x) + sigma * jax.random.normal(key, (x.shape[0], 2))

  return s, clean, noisy


def test_spsa_uses_common_random_numbers_for_stochastic_models():
  """The +delta and -delta probes of a direction see the same noise draw, so additive
  noise cancels: the estimate on the noisy model equals the noise-free one and points
  along the true gradient (with independent draws, noise / (2 delta) would swamp it)."""
  s, clean, noisy = _noisy_binary()
  x = jnp.asarray(np.random.RandomState(0).uniform(0.2, 0.8, size=(4, 4, 4, 1)),
                  jnp.float32)
  y = jnp.zeros(4, jnp.int32)
  loss_fn = A.make_loss("margin", y, None)
  key = rbg_key(0)
  _, _, g_clean = A.spsa_gradient(clean, loss_fn, 0.01, 64, 16)(x, key)
  _, _, g_noisy = A.spsa_gradient(A.eot(noisy, 2), loss_fn, 0.01, 64, 16)(x, key)
  g_clean, g_noisy = np.asarray(g_clean), np.asarray(g_noisy)
  np.testing.assert_allclose(g_noisy, g_clean, rtol=1e-3, atol=1e-3 * np.abs(g_clean).max())
  true = np.broadcast_to(np.asarray(s).reshape(1, 4, 4, 1), x.shape).reshape(4, -1)
  est = g_noisy.reshape(4, -1)
  cosine = np.sum(est * true, 1) / np.linalg.norm(est, axis=1) / np.linalg.norm(true, axis=1)
  assert np.all(cosine > 0.7), cosine


def test_spsa_on_a_noisy_model_is_as_strong_as_on_the_clean_model():
  _, clean, noisy = _noisy_binary()
  rng = np.random.RandomState(1)
  x = rng.uniform(0.3, 0.7, size=(64, 4, 4, 1)).astype(np.float32)
  y = np.asarray(clean(x).argmax(1)).astype(np.int32)
  attack = functools.partial(A.spsa, x=x, y=y, key=rbg_key(0), eps=0.05, steps=10,
                             num_samples=16)
  acc_clean = _acc(clean, attack(clean), y)
  acc_noisy = _acc(clean, attack(A.eot(noisy, 1)), y)
  assert acc_clean < 0.7, acc_clean
  assert acc_noisy <= acc_clean + 0.05, (acc_clean, acc_noisy)


def test_adam_ascent_steps_per_example_and_rejects_bad_arguments():
  project = lambda z: jnp.clip(z, 0.0, 1.0)
  z = jnp.full((2, 3), 0.5)
  grad = jnp.ones((2, 3))
  rule = A.adam_ascent(jnp.array([0.01, 0.1]), project)
  z1, _ = rule.update(0, z, None, None, grad, rule.init(z))
  # Adam's first step is lr * sign(g) (bias-corrected moments), per example
  np.testing.assert_allclose(z1[:, 0], [0.51, 0.6], rtol=1e-5)
  with pytest.raises(ValueError, match=r"adam_ascent: lr must be finite and >= 0; got -0.1"):
    A.adam_ascent(-0.1, project)
  with pytest.raises(ValueError, match=r"one value per example \[B\]; got shape \(2, 2\)"):
    A.adam_ascent(np.ones((2, 2)), project)
  with pytest.raises(TypeError, match="lr must be a non-negative number; got True"):
    A.adam_ascent(True, project)
  with pytest.raises(TypeError, match="project must be callable"):
    A.adam_ascent(0.01, None)
