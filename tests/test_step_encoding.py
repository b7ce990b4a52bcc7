"""The step encoding: configs and the zoo build the same model; rules are pure."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdefense as jd
from jaxdefense import configs, dynamics, models, training

D = dynamics


@pytest.mark.parametrize("step", [
    D.Euler(), D.EulerMaruyama(), D.EulerMaruyama(0.3, "sample", False),
    D.Damped(), D.Damped("gating_sig", (0.1, 0.2), False, False)])
def test_round_trip(step):
  spec = D.step_to_dict(step)
  assert spec["name"] == D.step_name(step)
  assert D.step_from_dict(spec) == step


def test_defaults_come_from_the_rule():
  for name, cls in D.STEP_RULES.items():
    assert D.step_from_dict({"name": name}) == cls()
  assert D.step_from_dict({"coef": 0.4}, base=D.EulerMaruyama(0.1, "fixed")) == \
      D.EulerMaruyama(0.4, "fixed")
  # a named rule other than base's starts from its own defaults
  assert D.step_from_dict({"name": "damped"}, base=D.EulerMaruyama(0.7)) == D.Damped()


def test_bad_specs_are_clear():
  with pytest.raises(ValueError, match="unknown model.step.name='eulr'.*Did you mean 'euler'"):
    D.step_from_dict({"name": "eulr"})
  with pytest.raises(ValueError, match="needs a name"):
    D.step_from_dict({"coef": 0.1})
  with pytest.raises(ValueError, match="'kind' .*does not apply to step 'euler_maruyama'"):
    D.step_from_dict({"name": "euler_maruyama", "kind": "sig"})
  with pytest.raises(TypeError, match="mapping"):
    D.step_from_dict("euler")
  with pytest.raises(TypeError, match="not a registered step rule"):
    D.step_to_dict(object())


def _fields(module):
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.name not in ("parent", "name")}


@pytest.mark.parametrize("name", models.names())
def test_config_route_builds_the_zoo_model(name):
  """``configs`` + ``build_model`` and ``models.create`` give the same module."""
  c = configs.get("demo", [f"model.name={name}", "model.normalize=false"])
  built = training.build_model(c, 10)
  direct = models.create(name, num_classes=10)
  assert type(built) is type(direct)
  assert _fields(built) == _fields(direct)
  assert models.step_of(built) == models.step_of(direct)


def test_enresnet_preset_keeps_its_noise_through_a_config():
  c = configs.get("demo", ["model.name=en_preact_resnet20"])
  model = training.build_model(c, 10)
  assert model.step == D.EulerMaruyama(coef=0.1)
  c = configs.get("demo", ["model.name=en2_preact_resnet20", "model.step.coef=0.3"])
  model = training.build_model(c, 10)
  assert isinstance(model, models.Ensemble) and model.member.step == D.EulerMaruyama(0.3)
  with pytest.raises(ValueError, match="carries its own step rule"):
    training.build_model(configs.get("demo", ["model.name=en_preact_resnet20",
                                              "model.step.name=damped"]), 10)
  with pytest.raises(ValueError, match="already an ensemble"):
    training.build_model(configs.get("demo", ["model.name=en2_preact_resnet20",
                                              "ensemble.size=3"]), 10)


def test_plain_preset_takes_any_named_step():
  c = configs.get("demo", ["model.name=preact_resnet8", "model.step.name=damped",
                           "model.step.kind=lambda"])
  assert training.build_model(c, 10).step == D.Damped("lambda")


CTX = D.StepContext(index=3, transition=False, train=False)


def test_damped_at_zero_lambda_is_the_resnet_step():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  fx = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
  euler = D.Euler()(x, fx, CTX)
  # the authors' storage: k = 1 gives lambda = relu(1 - k) = 0; stored lambda otherwise
  for rule, name, zero in ((D.Damped("relu"), "k", 1.0), (D.Damped("lambda"), "lambda", 0.0),
                           (D.Damped("relu", storage="lambda"), "lambda", 0.0)):
    out = rule(x, fx, CTX, params={name: jnp.float32(zero)})
    np.testing.assert_array_equal(out, euler)
  # lambda = 1 with the relu kind (k = 0): the plain CNN step x_{n+1} = f(x_n)
  out = D.Damped("relu")(x, fx, CTX, params={"k": jnp.float32(0.0)})
  np.testing.assert_allclose(out, fx, rtol=0, atol=0)


def test_rules_are_pure_and_declare_their_needs():
  x = jnp.ones((2, 4, 4, 3))
  assert D.Euler().param_specs(CTX, x) == {}
  specs = D.Damped("gating").param_specs(CTX, x)
  assert {k: v[1] for k, v in specs.items()} == {"gate_kernel": (1, 1, 3, 3),
                                                 "gate_bias": (3,)}
  assert D.Damped().param_specs(CTX._replace(index=0), x) == {}  # skip_first
  assert D.EulerMaruyama().needs_noise(CTX) and not D.EulerMaruyama(0.0).needs_noise(CTX)
  assert not D.EulerMaruyama(at_test=False).needs_noise(CTX)
  # the same key gives the same noise, another key other noise
  fx = jnp.zeros_like(x)
  rule = D.EulerMaruyama(1.0, "fixed")
  a = rule(x, fx, CTX, key=jax.random.key(0))
  np.testing.assert_array_equal(a, rule(x, fx, CTX, key=jax.random.key(0)))
  assert not np.allclose(a, rule(x, fx, CTX, key=jax.random.key(1)))
  with pytest.raises(ValueError, match="got no key"):
    rule(x, fx, CTX)
  with pytest.raises(ValueError, match="needs the parameters"):
    D.Damped()(x, fx, CTX, params={})


def test_apply_step_inside_a_model_matches_the_pure_rule():
  """A damped ResNet's block output is the pure rule applied to its own lambda."""
  model = models.create("preact_resnet8", step=D.Damped("lambda", skip_first=False))
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
  variables = model.init(jax.random.key(1), x)
  lam = variables["params"]["block0"]["lambda"]
  assert 0.2 <= float(lam) <= 0.25
  zero = jax.tree_util.tree_map(lambda a: a, variables)
  zero["params"]["block0"]["lambda"] = jnp.zeros_like(lam)
  euler = models.create("preact_resnet8")
  np.testing.assert_allclose(model.apply(zero, x), euler.apply(zero, x), rtol=1e-6, atol=1e-6)
  with pytest.raises(TypeError, match="step must be a step rule"):
    models.create("preact_resnet8", step=3).init(jax.random.key(0), x)  # names are accepted
