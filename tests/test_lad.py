"""LAD: layer-wise adjoint perturbations, Lie–Trotter and Strang–Marchuk placement."""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdefense as jd
from jaxdefense.models import _slots
from jaxdefense.objectives import LAD
from jaxdefense.objectives._lad import place

KEY = jax.random.key(0)
X = jax.random.uniform(KEY, (6, 10, 10, 1))
Y = jnp.arange(6) % 10


def _bound(name="preact_resnet8", **kw):
  module = jd.models.create(name, **kw)
  variables = module.init({"params": jax.random.key(1), "noise": jax.random.key(9)}, X)
  return module, variables


def _loss_and_grad(objective, module, variables, key=jax.random.key(2)):
  def loss(params):
    model = jd.models.bind(module, {**variables, "params": params}, train=True,
                           rngs={"noise": jax.random.key(5)})
    return objective(model, X, Y, key)[0]
  return jax.value_and_grad(loss)(variables["params"])


@pytest.mark.parametrize("base,splitting", [("pgd", "lie_trotter"), ("pgd", "strang_marchuk"),
                                            ("trades", "lie_trotter"),
                                            ("trades", "strang_marchuk")])
def test_eta_zero_is_the_base_objective(base, splitting):
  module, variables = _bound()
  lad = jd.objectives.get("lad", base=base, eta=0.0, splitting=splitting, steps=2)
  loss, grad = _loss_and_grad(lad, module, variables)
  loss_b, grad_b = _loss_and_grad(lad.base_objective, module, variables)
  assert float(loss) == float(loss_b)
  for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(grad_b)):
    np.testing.assert_array_equal(a, b)
  assert lad.base_objective == jd.objectives.get(base, steps=2)


def test_perturbations_change_the_loss_and_ascent_raises_it():
  module, variables = _bound()
  base = jd.objectives.get("pgd", steps=2)
  up = jd.objectives.get("lad", eta=0.2, steps=2)
  down = jd.objectives.get("lad", eta=0.2, steps=2, direction="descent")
  l0 = float(_loss_and_grad(base, module, variables)[0])
  assert float(_loss_and_grad(up, module, variables)[0]) > l0
  assert float(_loss_and_grad(down, module, variables)[0]) < l0


def test_adjoints_are_the_gradient_in_each_hidden_state():
  """Central finite differences of the loss along a random direction at every slot."""
  module, variables = _bound()
  model = jd.models.bind(module, variables, train=True)
  lad = LAD(eta=0.1, steps=1)
  x_adv = X * 0.9 + 0.05
  adj = lad.adjoints(model, X, x_adv, Y, KEY)
  assert len(adj) == module.num_blocks + 1
  rng = np.random.default_rng(0)
  h = 1e-3   # float32: smaller steps drown in rounding, larger ones cross ReLU kinks
  for k, a in enumerate(adj):
    d = jnp.asarray(rng.standard_normal(a.shape), jnp.float32)

    def loss(t):
      deltas = [None] * len(adj)
      deltas[k] = t * d
      logits = model.apply(x_adv, perturbations=deltas)[0]
      return jnp.mean(jd.attacks.cross_entropy(logits, Y))

    fd = (float(loss(h)) - float(loss(-h))) / (2 * h)
    exact = float(jnp.vdot(a, d)) / X.shape[0]   # adjoints are per example (x batch)
    assert abs(fd - exact) <= 0.05 * abs(exact) + 2e-3, (k, fd, exact)


class LinearToy(nn.Module):
  """x_0 = x, x_{n+1} = x_n + A_n x_n: the slot contract of the zoo, linear."""
  mats: Sequence[Any]

  @property
  def num_blocks(self):
    return len(self.mats)

  @nn.compact
  def __call__(self, x, train=False, perturbations=None, capture_states=False):
    with_stem, stem, deltas = _slots.split_perturbations(perturbations, self.num_blocks,
                                                         "LinearToy")
    states = []
    if with_stem:
      x = _slots.add(x, stem)
      states.append(x)
    for n, a in enumerate(self.mats):
      x = _slots.add(x + x @ jnp.asarray(a).T, None if deltas is None else deltas[n])
      states.append(x)
    return (x, states) if capture_states else x


@pytest.mark.parametrize("splitting", ["lie_trotter", "strang_marchuk"])
def test_the_two_splittings_place_the_perturbations_as_written(splitting):
  rng = np.random.default_rng(1)
  mats = [rng.standard_normal((3, 3)) * 0.3 for _ in range(3)]
  toy = LinearToy(tuple(map(tuple, map(tuple, mats))))
  x0 = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
  g = [jnp.asarray(rng.standard_normal((2, 3)), jnp.float32) for _ in range(4)]
  eta = 0.3
  out = toy.apply({}, x0, perturbations=place(g, eta, splitting))
  x = np.asarray(x0, np.float64)
  f = lambda n, z: z @ np.asarray(mats[n]).T
  for n in range(3):
    if splitting == "lie_trotter":   # x' = x_n + eta g_n, x_{n+1} = x' + f_n(x')
      xp = x + eta * np.asarray(g[n])
      x = xp + f(n, xp)
    else:  # x' = x_n + eta/2 g_n, x'' = x' + f_n(x'), x_{n+1} = x'' + eta/2 g_{n+1}
      xp = x + eta / 2 * np.asarray(g[n])
      x = xp + f(n, xp) + eta / 2 * np.asarray(g[n + 1])
  np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-5)


def test_adjoints_are_cut_from_the_parameter_gradient():
  """The LAD gradient equals the base outer loss's gradient with the perturbations held
  fixed: the adjoint pass contributes nothing to the parameter gradient."""
  module, variables = _bound()
  lad = LAD(eta=0.2, steps=2, splitting="strang_marchuk")
  key = jax.random.key(2)
  model = jd.models.bind(module, variables, train=True)
  x_adv = lad.base_objective.attack(model, X, Y, key)
  raw = lad.adjoints(model, X, x_adv, Y, jax.random.fold_in(key, 3))
  fixed = place([jnp.sign(a) for a in raw], 0.2, "strang_marchuk")

  def outer(params):
    m = jd.models.bind(module, {**variables, "params": params}, train=True)
    return lad.base_objective.outer(m, X, x_adv, Y, key, perturbations=fixed)[0]

  loss, grad = _loss_and_grad(lad, module, variables, key)
  loss_f, grad_f = jax.value_and_grad(outer)(variables["params"])
  np.testing.assert_allclose(float(loss), float(loss_f), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(grad_f)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step", [jd.dynamics.EulerMaruyama(coef=0.1),
                                  jd.dynamics.Damped("relu", skip_first=False)])
def test_stochastic_and_damped_models_train_with_lad(step):
  module, variables = _bound(step=step)
  for splitting in ("lie_trotter", "strang_marchuk"):
    lad = jd.objectives.from_config({"name": "lad", "eta": 0.1, "steps": 2,
                                     "splitting": splitting, "normalization": "l2"})
    loss, grad = _loss_and_grad(lad, module, variables)
    assert np.isfinite(float(loss))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grad))


def test_sonet_has_the_slots_too():
  module, variables = _bound("sonet_small")
  lad = LAD(eta=0.1, steps=1, splitting="strang_marchuk")
  loss, _ = _loss_and_grad(lad, module, variables)
  assert np.isfinite(float(loss))
  logits, states = module.apply(variables, X, perturbations=[None] * 3, capture_states=True)
  assert len(states) == 3 and states[0].shape == (6, 10, 10, 16)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="LAD.eta"):
    LAD(eta=-0.1)
  with pytest.raises(ValueError, match="LAD.splitting"):
    LAD(splitting="strang")
  with pytest.raises(ValueError, match="LAD.base"):
    LAD(base="natural")
  with pytest.raises(ValueError, match="beta"):
    LAD(base="pgd", beta=6.0)
  with pytest.raises(ValueError, match="LAD.normalization"):
    LAD(normalization="linf")
  with pytest.raises(ValueError, match="perturbation slots"):
    LAD(steps=1)(jd.models.ModelFn.wrap(lambda x: x.reshape(x.shape[0], -1)[:, :10]), X, Y, KEY)
  module, variables = _bound()
  with pytest.raises(ValueError, match=r"one entry per block \(3\), or one more"):
    module.apply(variables, X, perturbations=[None] * 5)


def test_eta_schedule_follows_the_epoch():
  lad = jd.objectives.from_config({"name": "lad", "eta": 0.2, "steps": 1,
                                   "eta_schedule": {"start": 0.0, "end": 1.0, "ramp": 4.0}})
  assert float(lad.eta_at(0.0)) == 0.0
  assert abs(float(lad.eta_at(2.0)) - 0.1) < 1e-7 and abs(float(lad.eta_at(None)) - 0.2) < 1e-7
  module, variables = _bound()
  model = jd.models.bind(module, variables, train=True)
  base = float(lad.base_objective(model, X, Y, KEY)[0])
  assert float(lad(model, X, Y, KEY, epoch=0.0)[0]) == pytest.approx(base, abs=1e-6)
  loss, aux = lad(model, X, Y, KEY, epoch=4.0)
  assert float(loss) != pytest.approx(base, abs=1e-4) and float(aux["lad_eta"]) == \
      pytest.approx(0.2)
  with pytest.raises(ValueError, match="eta_schedule"):
    LAD(eta_schedule={"begin": 0.0})
