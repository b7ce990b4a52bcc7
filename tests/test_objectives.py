"""Tests of jaxdefense.objectives: values, gradients, stop-gradient, configs, errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxdefense import attacks
from jaxdefense import objectives as O
from jaxdefense.models import ModelFn, bind


def _wrapped(params):
  """The MLP with ``params`` as a deterministic ModelFn (what objectives take)."""
  return ModelFn.wrap(lambda z: _mlp(params, z))


def _init(key, dim=36, hidden=16, classes=4):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (dim, hidden)) / 6, "b1": jnp.zeros(hidden),
          "w2": jax.random.normal(k2, (hidden, classes)) / 4, "b2": jnp.zeros(classes)}


def _mlp(params, x):
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


@pytest.fixture(scope="module")
def batch():
  rng = np.random.RandomState(0)
  x = rng.uniform(size=(8, 6, 6, 1)).astype(np.float32)
  y = rng.randint(0, 4, size=8).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y), _init(jax.random.key(0))


KEY = jax.random.key(1, impl="rbg")  # fast to compile on CPU

OBJECTIVES = {
    "natural": O.Natural(),
    "pgd": O.PGDAdversarial(eps=0.1, step_size=0.03, steps=3),
    "pgd_mix": O.PGDAdversarial(eps=0.1, step_size=0.03, steps=3, mix=0.5),
    "trades": O.TRADES(beta=6.0, eps=0.1, step_size=0.03, steps=3),
    "trades_beta0": O.TRADES(beta=0.0, eps=0.1, step_size=0.03, steps=3),
}

_JITTED = {}


def loss_and_grad(name):
  """One jitted ``value_and_grad`` per objective, reused across tests."""
  if name not in _JITTED:
    objective = OBJECTIVES[name]

    def loss(params, x, y, key):
      return objective(_wrapped(params), x, y, key)

    _JITTED[name] = jax.jit(jax.value_and_grad(loss, has_aux=True))
  return _JITTED[name]


def _ce(params, x, y):
  return float(optax.softmax_cross_entropy_with_integer_labels(_mlp(params, x), y).mean())


def test_natural_loss_is_cross_entropy(batch):
  x, y, params = batch
  (loss, aux), _ = loss_and_grad("natural")(params, x, y, KEY)
  np.testing.assert_allclose(float(loss), _ce(params, x, y), rtol=1e-6)
  np.testing.assert_allclose(aux["logits"], _mlp(params, x), rtol=1e-6)


def test_pgd_loss_is_the_cross_entropy_at_its_attack(batch):
  x, y, params = batch
  (loss, aux), _ = loss_and_grad("pgd")(params, x, y, KEY)
  obj = OBJECTIVES["pgd"]
  # the same attack, run explicitly with the same key
  x_adv = jax.jit(lambda p: attacks.pgd(_wrapped(p), x, y, key=KEY, eps=obj.eps,
                                        step_size=obj.step_size, steps=obj.steps,
                                        random_start=True))(params)
  delta = np.abs(np.asarray(x_adv) - np.asarray(x))
  assert delta.max() <= obj.eps + 1e-6 and delta.max() > obj.eps / 2   # in the ball, moved
  assert 0.0 <= float(x_adv.min()) and float(x_adv.max()) <= 1.0       # in the box
  assert aux["logits"].shape == (8, 4)
  np.testing.assert_allclose(aux["logits"], _mlp(params, x_adv), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss), _ce(params, x_adv, y), rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(aux["loss_adv"]), rtol=1e-6)
  assert abs(float(loss) - _ce(params, x, y)) > 1e-3   # not the clean loss


def test_pgd_mix_interpolates(batch):
  x, y, params = batch
  (loss, aux), _ = loss_and_grad("pgd_mix")(params, x, y, KEY)
  expected = 0.5 * aux["loss_adv"] + 0.5 * aux["loss_clean"]
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
  np.testing.assert_allclose(float(aux["loss_clean"]), _ce(params, x, y), rtol=1e-6)


def test_trades_beta_zero_is_natural(batch):
  x, y, params = batch
  (loss, aux), grads = loss_and_grad("trades_beta0")(params, x, y, KEY)
  np.testing.assert_allclose(float(loss), _ce(params, x, y), rtol=1e-6)
  (_, _), natural_grads = loss_and_grad("natural")(params, x, y, KEY)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(natural_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(aux["logits"], _mlp(params, x), rtol=1e-6)


def test_trades_adds_nonnegative_kl(batch):
  x, y, params = batch
  (loss, aux), _ = loss_and_grad("trades")(params, x, y, KEY)
  assert float(aux["loss_robust"]) > 0.0
  np.testing.assert_allclose(float(loss), float(aux["loss_clean"] + 6.0 * aux["loss_robust"]),
                             rtol=1e-6)
  # The inner maximisation increased the KL from the 0.001-noise start.
  assert float(aux["loss_robust"]) > 1e-4


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_parameter_gradients_finite_and_nonzero(batch, name):
  x, y, params = batch
  (loss, aux), grads = loss_and_grad(name)(params, x, y, KEY)
  assert np.isfinite(float(loss))
  assert "logits" in aux
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_pgd_gradient_flows_only_through_outer_loss(batch):
  """grad of PGD-AT == grad of CE at the (fixed) adversarial points."""
  x, y, params = batch
  objective = OBJECTIVES["pgd"]
  (_, _), grads = loss_and_grad("pgd")(params, x, y, KEY)
  x_adv = attacks.pgd(lambda z: _mlp(params, z), x, y, key=KEY, eps=objective.eps,
                      step_size=objective.step_size, steps=objective.steps)
  expected = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      _mlp(p, x_adv), y).mean())(params)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_inner_attack_is_not_differentiated(batch):
  """The backward pass holds no loop: the attack is cut from the parameter gradient."""
  x, y, params = batch
  for name in ("pgd", "trades"):
    objective = OBJECTIVES[name]
    jaxpr = jax.make_jaxpr(jax.grad(
        lambda p: objective(_wrapped(p), x, y, KEY)[0]))(params)
    text = str(jaxpr)
    assert text.count("scan[") + text.count("while[") == 1, name


def test_no_retracing_across_calls(batch):
  x, y, params = batch
  traces = []
  objective = OBJECTIVES["trades"]

  @jax.jit
  def step(params, x, y, key):
    traces.append(1)
    return jax.grad(lambda p: objective(_wrapped(p), x, y, key)[0])(params)

  step(params, x, y, KEY)
  params2 = jax.tree.map(lambda p: p + 0.01, params)
  step(params2, x + 0.0, (y + 1) % 4, jax.random.key(7, impl="rbg"))
  assert len(traces) == 1


def test_objectives_are_hashable_static_arguments(batch):
  x, y, params = batch
  f = jax.jit(lambda obj, p, x, y, k: obj(_wrapped(p), x, y, k)[0],
              static_argnums=0)
  a = f(O.Natural(), params, x, y, KEY)
  b = f(O.Natural(), params, x, y, KEY)
  assert float(a) == float(b)
  assert hash(O.PGDAdversarial()) == hash(O.PGDAdversarial())


def test_eval_attack_mode_attacks_the_evaluation_mode_model(batch):
  """attack_mode="eval": the inner attack runs on model.with_mode(False) (running
  statistics), the outer pass on the training-mode model."""
  x, y, _ = batch
  module = _TinyBN()
  variables = dict(module.init(jax.random.key(0), x))
  # non-trivial running statistics: evaluation and training mode differ
  variables["batch_stats"] = jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])
  train = bind(module, variables, train=True)
  evaluation = bind(module, variables)
  assert float(jnp.max(jnp.abs(train(x) - evaluation(x)))) > 1e-3
  kw = dict(eps=0.1, step_size=0.03, steps=3)
  for mode, attacked in (("eval", evaluation), ("train", train)):
    _, aux = O.PGDAdversarial(attack_mode=mode, **kw)(train, x, y, KEY)
    x_adv = attacks.pgd(attacked, x, y, key=KEY, **kw)
    np.testing.assert_allclose(aux["logits"], train(x_adv), rtol=1e-5, atol=1e-6)
  _, aux_eval = O.PGDAdversarial(attack_mode="eval", **kw)(train, x, y, KEY)
  _, aux_train = O.PGDAdversarial(attack_mode="train", **kw)(train, x, y, KEY)
  assert float(jnp.max(jnp.abs(aux_eval["logits"] - aux_train["logits"]))) > 1e-4


def test_outer_passes_draw_independent_model_noise(batch):
  """The clean and adversarial forward passes get different noise (as two PyTorch calls)."""
  x, y, params = batch
  module = _TinyBN(noise=0.3)
  variables = module.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, x)
  # the training step's form: default noise unless a pass is given its own key
  noisy = bind(module, variables, train=True, rngs={"noise": jax.random.key(99)})
  default = noisy.apply(x)[0]
  _, aux = O.TRADES(eps=0.1, step_size=0.03, steps=2)(noisy, x, y, KEY)
  assert float(jnp.max(jnp.abs(aux["logits"] - default))) > 1e-2   # clean: its own draw
  _, aux = O.PGDAdversarial(eps=0.1, step_size=0.03, steps=2, mix=0.5)(noisy, x, y, KEY)
  assert float(jnp.max(jnp.abs(aux["clean_logits"] - default))) > 1e-2
  # a deterministic wrapped logits function is called as it is
  _, aux = O.TRADES(eps=0.1, step_size=0.03, steps=2)(_wrapped(params), x, y, KEY)
  np.testing.assert_allclose(aux["logits"], _mlp(params, x), rtol=1e-6)


def test_attack_modes():
  assert O.TRADES().attack_mode == "eval" and O.PGDAdversarial().attack_mode == "train"
  assert O.from_config({"name": "pgd", "attack_mode": "eval"}).attack_mode == "eval"
  with pytest.raises(ValueError, match=r"TRADES.attack_mode must be one of \['eval', "
                                       r"'train'\]; got 'test'"):
    O.TRADES(attack_mode="test")


def test_kl_divergence():
  p = jax.random.normal(jax.random.key(0), (3, 5))
  np.testing.assert_allclose(O.kl_divergence(p, p), 0.0, atol=1e-6)
  q = p.at[:, 0].add(2.0)
  kl = np.asarray(O.kl_divergence(p, q))
  ps, qs = jax.nn.softmax(p), jax.nn.softmax(q)
  np.testing.assert_allclose(kl, np.sum(ps * np.log(ps / qs), axis=1), rtol=1e-4)


# --------------------------------------------------------------------- configs


def test_get_and_from_config():
  assert O.get("natural") == O.Natural()
  assert O.get("madry", eps=0.031) == O.PGDAdversarial(eps=0.031)
  assert O.get("PGD-AT", steps=7).steps == 7
  cfg = {"name": "pgd", "eps": 0.031, "step_size": 0.007, "steps": 10, "mix": 0.0}
  assert O.from_config(cfg) == O.PGDAdversarial(eps=0.031, step_size=0.007, steps=10)
  config = ml_collections.ConfigDict({"name": "trades", "beta": 1.0, "eps": 0.031})
  assert O.from_config(config) == O.TRADES(beta=1.0, eps=0.031)
  assert O.from_config("trades") == O.TRADES()
  assert set(O.names()) >= {"natural", "pgd", "trades"}
  assert isinstance(O.PGDAdversarial(steps=np.int64(3)).steps, int)
  assert isinstance(O.TRADES(eps=0).eps, float)


def test_register_a_new_objective():
  import dataclasses

  @dataclasses.dataclass(frozen=True)
  class Scaled:
    scale: float = 2.0

    def __call__(self, logits_fn, x, y, key):
      loss, aux = O.Natural()(logits_fn, x, y, key)
      return self.scale * loss, aux

  O.register("scaled_test", Scaled)
  assert O.from_config({"name": "scaled_test", "scale": 3.0}) == Scaled(3.0)
  with pytest.raises(ValueError, match="already registered"):
    O.register("scaled_test", Scaled)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['bad'\]"):
    O.get("scaled_test", bad=1)
  # names are looked up as they are registered: case and '-' / '_' alike
  O.register("My-Scaled-Test", Scaled)
  assert O.get("my_scaled_test") == Scaled() == O.get("MY-SCALED-TEST")
  # an alias cannot be shadowed by a registration that would never be looked up
  with pytest.raises(ValueError, match="'madry' is an alias of 'pgd'"):
    O.register("madry", Scaled, overwrite=True)
  assert O.get("madry") == O.PGDAdversarial()


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: O.get("fgsm_training"), ValueError, r"unknown objective 'fgsm_training'.*natural"),
    (lambda: O.get("pgd", epsilon=0.1), ValueError,
     r"unknown option\(s\) \['epsilon'\].*'eps'"),
    (lambda: O.from_config({"eps": 0.1}), ValueError, r"needs a 'name' key"),
    (lambda: O.from_config(42), TypeError, r"dict or ml_collections.ConfigDict"),
    (lambda: O.from_config({"name": "trades", "beta": -1.0}), ValueError, r"beta must be >= 0"),
    (lambda: O.PGDAdversarial(eps=8), ValueError, r"eps.*8/255"),
    (lambda: O.PGDAdversarial(eps=-0.1), ValueError, r"eps must be >= 0"),
    (lambda: O.PGDAdversarial(steps=0), ValueError, r"steps must be >= 1"),
    (lambda: O.PGDAdversarial(steps=2.5), TypeError, r"steps must be an integer"),
    (lambda: O.PGDAdversarial(mix=1.5), ValueError, r"mix must be <= 1"),
    (lambda: O.PGDAdversarial(step_size="2/255"), TypeError, r"step_size must be a real"),
    (lambda: O.TRADES(init_std=-1.0), ValueError, r"init_std must be >= 0"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_config_errors(call, exc, pattern):
  with pytest.raises(exc, match=pattern):
    call()


def test_bad_batch_errors(batch):
  x, y, params = batch
  f = _wrapped(params)
  for objective in (O.Natural(), O.PGDAdversarial(), O.TRADES(), O.CertifiedObjective()):
    with pytest.raises(TypeError, match="model must be a jaxdefense.models.ModelFn"):
      objective(lambda z: _mlp(params, z), x, y, KEY)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    O.PGDAdversarial()(f, x * 255, y, KEY)
  with pytest.raises(ValueError, match="one label per image"):
    O.TRADES()(f, x, y[:3], KEY)
  with pytest.raises(TypeError, match="integer class labels"):
    O.Natural()(f, x, y.astype(jnp.float32), KEY)


# ------------------------------------------------ training-loop contract (model state)


class _TinyBN(nn.Module):
  """Dense -> BatchNorm -> ReLU -> (noise) -> Dense, for the (logits, state) contract."""
  noise: float = 0.0

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Dense(16)(x.reshape(x.shape[0], -1))
    h = nn.relu(nn.BatchNorm(use_running_average=not train)(h))
    if self.noise:
      h = h + self.noise * jax.random.normal(self.make_rng("noise"), h.shape)
    return nn.Dense(4)(h)


def _loop_model(model, params, model_state, default_key):
  """The training step's model: ``bind(..., train=True, rngs=default noise)``."""
  return bind(model, {"params": params, **model_state}, train=True,
              rngs={"noise": default_key})


@pytest.fixture(scope="module")
def bn_model(batch):
  x = batch[0]
  model = _TinyBN(noise=0.3)
  variables = dict(model.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, x))
  params = variables.pop("params")
  return model, params, variables


@pytest.mark.parametrize("name", ["natural", "pgd", "trades"])
def test_training_loop_contract_returns_model_state(batch, bn_model, name):
  x, y, _ = batch
  model, params, model_state = bn_model
  objective = OBJECTIVES[name]
  traces = []

  @jax.jit
  def step(params, x, y, key):
    traces.append(1)
    def loss(p):
      return objective(_loop_model(model, p, model_state, jax.random.fold_in(key, 7)),
                       x, y, key)
    return jax.value_and_grad(loss, has_aux=True)(params)

  (loss, aux), grads = step(params, x, y, KEY)
  assert np.isfinite(float(loss))
  assert jax.tree.structure(aux["model_state"]) == jax.tree.structure(model_state)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # The state is the batch statistics of the pass the loss trains on.
  if name == "natural":
    clean_state = _loop_model(model, params, model_state,
                              jax.random.fold_in(KEY, 7)).apply(x)[1]
    for a, b in zip(jax.tree.leaves(aux["model_state"]), jax.tree.leaves(clean_state)):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  # Deterministic for a key although every attack iteration draws fresh noise.
  (loss2, _), _ = step(params, x, y, KEY)
  assert float(loss) == float(loss2)
  step(jax.tree.map(lambda p: p * 1.01, params), x, y, jax.random.key(3, impl="rbg"))
  assert len(traces) == 1


def test_training_build_objective_accepts_these_objectives():
  from jaxdefense import training
  spec = ml_collections.ConfigDict({"name": "pgd", "eps": 0.03, "steps": 2,
                                    "step_size": 0.01})
  assert training.build_objective(spec) == O.PGDAdversarial(eps=0.03, steps=2, step_size=0.01)
  spec = ml_collections.ConfigDict({"name": "trades", "beta": 1.0})
  assert training.build_objective(spec) == O.TRADES(beta=1.0)
