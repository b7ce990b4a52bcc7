"""Robustness tables and gradient-masking diagnostics on a small trained model."""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdefense as jd

EPS = 0.1


@pytest.fixture(scope="module")
def trained():
  """An MLP trained on digits to ~95 % test accuracy (a few seconds)."""
  train = jd.data.load("digits", "train")
  test = jd.data.load("digits", "test")
  model = jd.models.create("mlp", hidden=(64,), num_classes=10)
  x, y = jnp.asarray(train.images), jnp.asarray(train.labels)
  params = model.init(jax.random.key(0), x[:2])
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
    g = jax.grad(loss)(params)
    updates, opt = tx.update(g, opt)
    return optax.apply_updates(params, updates), opt
  for _ in range(300):
    params, opt = step(params, opt)
  logits_fn = jax.jit(lambda xb: model.apply(params, xb))
  return logits_fn, test.images[:128], test.labels[:128]


def test_report_numbers_and_tables(trained, tmp_path):
  logits_fn, x, y = trained
  rep = jd.evaluation.evaluate_robustness(
      logits_fn, x, y, key=jax.random.key(1), eps=EPS, suite="fgsm,pgd:steps=10",
      corruptions=("gaussian_noise",), severities=(1, 5), batch_size=64, progress=False,
      meta={"title": "digits mlp"})
  assert rep.clean > 0.9
  acc_fgsm, acc_pgd = rep.attacks["fgsm"], rep.attacks["pgd(steps=10)"]
  assert acc_pgd <= acc_fgsm + 1e-9 and acc_fgsm < rep.clean
  # independent check of the clean number
  expected = float(np.mean(np.argmax(np.asarray(logits_fn(jnp.asarray(x))), -1) == y))
  assert rep.clean == pytest.approx(expected)
  assert set(rep.corruptions["gaussian_noise"]) == {1, 5}
  assert rep.corruptions["gaussian_noise"][5] <= rep.corruptions["gaussian_noise"][1] + 0.05
  text = rep.to_text()
  assert "pgd(steps=10)" in text and "%" in text
  md, js = rep.save(tmp_path)
  assert "| clean |" in open(md).read()
  assert json.load(open(js))["attacks"]["fgsm"] == acc_fgsm


def test_partial_last_batch_counts_every_example_once(trained):
  logits_fn, x, y = trained
  full = jd.evaluation.evaluate_robustness(logits_fn, x[:100], y[:100], key=jax.random.key(0),
                                           suite=(), batch_size=100, progress=False)
  odd = jd.evaluation.evaluate_robustness(logits_fn, x[:100], y[:100], key=jax.random.key(0),
                                          suite=(), batch_size=64, progress=False)
  assert full.clean == odd.clean and odd.num_examples == 100


def test_stochastic_models_are_attacked_with_eot(trained):
  logits_fn, x, y = trained
  draws = set()   # every noise draw the model makes, seen from the host

  def record(noise):
    draws.add(np.asarray(noise).tobytes())

  def noisy(xb, key):
    noise = jax.random.normal(key, (xb.shape[0], 10))
    jax.debug.callback(record, noise)
    return logits_fn(xb) + 0.5 * noise

  def run(eot_samples):
    draws.clear()
    rep = jd.evaluation.evaluate_robustness(
        noisy, x[:64], y[:64], key=jax.random.key(2), eps=EPS, suite="fgsm", stochastic=True,
        eot_samples=eot_samples, batch_size=64, progress=False)
    return rep, len(draws)
  rep, n_eot4 = run(4)
  assert rep.meta["eot_samples"] == 4 and rep.meta["stochastic"]
  assert rep.attacks["fgsm"] < rep.clean
  rep1, n_eot1 = run(1)
  assert rep1.meta["eot_samples"] == 1
  # One batch, one FGSM gradient: with EOT over 4 draws the attack sees 3 more distinct
  # noise draws per gradient than with 1 (a model attacked without EOT, EOT with a fixed
  # number of draws, or draws that share one key, would make the two counts equal).
  assert n_eot1 >= 2   # clean and attacked classification draw noise too
  assert n_eot4 - n_eot1 > 0 and (n_eot4 - n_eot1) % 3 == 0, (n_eot4, n_eot1)


def test_plain_model_passes_the_masking_checks(trained):
  logits_fn, x, y = trained
  diag = jd.evaluation.diagnose(logits_fn, x[:64], y[:64], key=jax.random.key(3), eps=EPS,
                                pgd_steps=10, spsa_steps=30, spsa_samples=32, batch_size=64)
  assert not diag.masked, diag.to_text()
  assert not diag["randomness"].flagged
  assert "no sign of gradient masking" in diag.to_text()


def test_quantised_input_layer_is_flagged(trained):
  logits_fn, x, y = trained

  def masked(xb):  # quantise the input under stop_gradient: all input gradients vanish
    return logits_fn(jax.lax.stop_gradient(jnp.round(xb * 4) / 4))
  diag = jd.evaluation.diagnose(masked, x[:64], y[:64], key=jax.random.key(4), eps=EPS,
                                pgd_steps=10, spsa_steps=30, spsa_samples=32, batch_size=64,
                                surrogate_fn=logits_fn)
  assert diag.masked
  assert diag["bad_gradients"].flagged
  assert diag["bad_gradients"].numbers["zero_fraction"] == 1.0
  assert diag["transfer_stronger"].flagged or diag["black_box_stronger"].flagged
  assert json.dumps(diag.to_json())


def test_bad_inputs_are_clear_errors(trained):
  logits_fn, x, y = trained
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="unknown attack 'pgdd'"):
    jd.evaluation.evaluate_robustness(logits_fn, x, y, key=key, suite="pgdd")
  with pytest.raises(ValueError, match="key=value"):
    jd.evaluation.parse_attack("pgd:steps")
  with pytest.raises(ValueError, match="eps must be <= 1"):
    jd.evaluation.evaluate_robustness(logits_fn, x, y, key=key, eps=8)
  with pytest.raises(ValueError, match="corruptions must be one of"):
    jd.evaluation.evaluate_robustness(logits_fn, x, y, key=key, suite=(),
                                      corruptions=("fog",))
  with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]"):
    jd.evaluation.evaluate_robustness(logits_fn, x * 255, y, key=key)
  with pytest.raises(ValueError, match="large_eps must exceed eps"):
    jd.evaluation.diagnose(logits_fn, x, y, key=key, eps=0.3, large_eps=0.2)


def test_step_fraction_sets_the_step_relative_to_eps():
  w = jax.random.normal(jax.random.key(0), (16, 3))
  f = lambda x: x.reshape(x.shape[0], -1) @ w
  x = jax.random.uniform(jax.random.key(1), (4, 4, 4, 1))
  y = jnp.array([0, 1, 2, 0])
  spec = jd.evaluation.parse_attack("ifgsm:steps=20,step_fraction=1/4")
  assert spec.step_fraction == 0.25 and "step_size" not in spec.kwargs
  for eps in (0.05, 0.1):
    np.testing.assert_array_equal(
        spec.run(f, x, y, jax.random.key(2), eps),
        jd.attacks.ifgsm(f, x, y, eps=eps, step_size=eps / 4, steps=20))
  # the EnResNet paper's suite: IFGSM-20 with steps of eps / 4 (2/255 at 8/255)
  ifgsm = jd.evaluation.parse_suite("enresnet")[1]
  assert ifgsm.kwargs["steps"] == 20 and ifgsm.step_fraction == 0.25
  with pytest.raises(ValueError, match="step_size or step_fraction, not both"):
    jd.evaluation.parse_attack("pgd:step_size=0.01,step_fraction=0.5")
  with pytest.raises(ValueError, match="step_fraction must be a number > 0"):
    jd.evaluation.parse_attack("pgd:step_fraction=-1")


def test_diagnose_radii_increase_up_to_large_eps():
  w = jax.random.normal(jax.random.key(0), (16, 3))
  f = jax.jit(lambda x: x.reshape(x.shape[0], -1) @ w)
  x = np.asarray(jax.random.uniform(jax.random.key(1), (8, 4, 4, 1)))
  y = np.asarray(jnp.argmax(f(x), -1))
  # 2 * eps > large_eps: the curve must not end below its largest radius (nor pass 1)
  for eps, large in ((0.3, 0.5), (0.6, 0.9)):
    diag = jd.evaluation.diagnose(f, x, y, key=jax.random.key(2), eps=eps, large_eps=large,
                                  pgd_steps=3, spsa_steps=2, spsa_samples=4, batch_size=8)
    radii = diag["not_monotone_in_eps"].numbers["eps"]
    assert radii == sorted(radii) and radii[-1] == large and len(set(radii)) == len(radii)
    assert "randomness" not in diag.to_text().splitlines()[0]


def test_a_bound_model_is_evaluated_as_its_plain_function():
  """ModelFn (models.bind) and the plain-function form give the same report; the
  plain form's explicit stochastic flag must agree with a ModelFn's."""
  model = jd.models.create("mlp", hidden=(16,), num_classes=10)
  test = jd.data.load("digits", "test")
  x, y = test.images[:40], test.labels[:40]
  v = model.init(jax.random.key(0), jnp.asarray(x[:2]))
  bound = jd.models.bind(model, v)
  plain = jax.jit(lambda xb: model.apply(v, xb))
  kw = dict(key=jax.random.key(1), eps=EPS, suite="fgsm,pgd:steps=3", batch_size=16,
            progress=False)
  a = jd.evaluation.evaluate_robustness(bound, x, y, **kw)
  b = jd.evaluation.evaluate_robustness(plain, x, y, **kw)
  assert a.clean == b.clean and a.attacks == b.attacks and not a.meta["stochastic"]
  assert jd.evaluation.accuracy_vs_eps(bound, x, y, key=jax.random.key(2),
                                       eps_values=(0.0, EPS), attack="fgsm")[0][1] == a.clean
  with pytest.raises(ValueError, match="stochastic=True was given for a ModelFn"):
    jd.evaluation.evaluate_robustness(bound, x, y, stochastic=True, **kw)
  with pytest.raises(TypeError, match="logits_fn must be callable"):
    jd.evaluation.evaluate_robustness("model", x, y, **kw)


def test_plot_accuracy_vs_eps_writes_a_png_and_keeps_the_backend(tmp_path):
  matplotlib = pytest.importorskip("matplotlib")
  before = matplotlib.get_backend()
  matplotlib.use("svg")            # stands for a notebook's inline backend
  try:
    path = tmp_path / "curve.png"
    out = jd.evaluation.plot_accuracy_vs_eps({"a": [(0.0, 0.9), (2 / 255, 0.5)],
                                              "b": [(0.0, 0.8), (2 / 255, 0.6)]}, str(path))
    assert out == str(path) and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == "svg"   # the caller's backend survives
  finally:
    matplotlib.use(before)


def test_clean_and_attacked_accuracy_share_one_prediction_program(caplog):
  """Clean images and every attack's images go through one compiled prediction per
  model structure; a second model of the same structure (other weights) compiles
  nothing at all."""
  model = jd.models.create("mlp", hidden=(12,), num_classes=10)
  test = jd.data.load("digits", "test")
  x, y = test.images[:40], test.labels[:40]
  kw = dict(key=jax.random.key(1), eps=EPS, suite="fgsm,pgd:steps=2", batch_size=16,
            progress=False)
  first = jd.models.bind(model, model.init(jax.random.key(0), jnp.asarray(x[:2])))
  other = jd.models.bind(model, model.init(jax.random.key(5), jnp.asarray(x[:2])))

  def compiled(m):
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
      rep = jd.evaluation.evaluate_robustness(m, x, y, **kw)
    return rep, [r.getMessage().split(" with ")[0] for r in caplog.records
                 if r.getMessage().startswith("Compiling ")]
  rep, programs = compiled(first)
  assert programs.count("Compiling jit(_correct)") <= 1   # 0 if an earlier test made it
  assert not any("clean_correct" in p for p in programs)
  expected = np.mean(np.argmax(np.asarray(first(jnp.asarray(x))), -1) == y)
  assert rep.clean == pytest.approx(expected)
  assert compiled(other)[1] == []
