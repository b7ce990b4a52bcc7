"""The one model contract (models.ModelFn / bind) and the one batch runner (data.run_batches)."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdefense as jd
from jaxdefense import dynamics
from jaxdefense.models import ModelFn, bind

from conftest import run_python


class Tiny(nn.Module):
  """Dense -> BatchNorm -> (noise when the step rule is stochastic) -> Dense."""
  step: Any = dynamics.Euler()

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Dense(8)(x.reshape(x.shape[0], -1))
    h = nn.BatchNorm(use_running_average=not train)(h)
    if dynamics.is_stochastic(self.step, train):
      h = h + 0.5 * jax.random.normal(self.make_rng("noise"), h.shape)
    return nn.Dense(3)(h)


X = jnp.asarray(np.random.RandomState(0).uniform(size=(5, 4, 4, 1)).astype(np.float32))
NOISY = dynamics.EulerMaruyama(coef=0.1)


@pytest.fixture(scope="module")
def variables():
  v = dict(Tiny().init(jax.random.key(0), X))
  # non-trivial running statistics: training and evaluation mode differ
  v["batch_stats"] = jax.tree.map(lambda a: a + 0.5, v["batch_stats"])
  return v


def _close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
  assert jax.tree.structure(a) == jax.tree.structure(b)


# ------------------------------------------------------------------------ bind
def test_bind_evaluation_and_training_mode(variables):
  module = Tiny()
  m = bind(module, variables)
  assert not m.stochastic and not m.train
  _close(m(X), module.apply(variables, X))
  logits, state = m.apply(X)
  _close(logits, module.apply(variables, X))
  _close(state, {"batch_stats": variables["batch_stats"]})   # evaluation: unchanged
  t = bind(module, variables, train=True)
  want, new = module.apply(variables, X, train=True, mutable=["batch_stats"])
  got, got_state = t.apply(X)
  _close(got, want)
  _close(got_state, dict(new))
  assert float(jnp.max(jnp.abs(got - logits))) > 1e-3         # the modes really differ
  _close(m.with_mode(True).apply(X), t.apply(X))
  _close(t.with_mode(False)(X), m(X))
  assert t.with_mode(False).train is False and m.with_mode(True).train is True
  # other variables, same module and mode
  doubled = jax.tree.map(lambda a: 2 * a, variables)
  _close(m.with_variables(doubled)(X), module.apply(doubled, X))


def test_stochastic_model_needs_a_key(variables):
  module = Tiny(step=NOISY)
  m = bind(module, variables)
  assert m.stochastic and jd.models.is_stochastic(module)
  assert not bind(Tiny(step=dynamics.EulerMaruyama(coef=0.1, at_test=False)),
                  variables).stochastic
  with pytest.raises(ValueError, match=r"Tiny draws noise at evaluation time.*m\(x, key\)"):
    m(X)
  with pytest.raises(ValueError, match="stochastic"):
    m.apply(X)
  key = jax.random.key(3)
  noise, dropout = jax.random.split(key)
  _close(m(X, key), module.apply(variables, X, rngs={"noise": noise, "dropout": dropout}))
  assert float(jnp.max(jnp.abs(m(X, key) - m(X, jax.random.key(4))))) > 1e-3
  # default rngs (the training step's): no key needed, and a key overrides them
  d = bind(module, variables, rngs={"noise": noise, "dropout": dropout})
  _close(d(X), m(X, key))
  assert float(jnp.max(jnp.abs(d(X) - d(X, jax.random.key(4))))) > 1e-3


def test_wrap_plain_functions(variables):
  f = lambda x: Tiny().apply(variables, x)
  w = ModelFn.wrap(f)
  assert not w.stochastic and w.module is None
  _close(w(X), f(X))
  logits, state = w.apply(X)
  _close(logits, f(X))
  assert state == {}
  assert ModelFn.wrap(w) is w
  g = lambda x, k: f(x) + jax.random.normal(k, (x.shape[0], 3))
  s = ModelFn.wrap(g, stochastic=True)
  assert s.stochastic
  _close(s(X, jax.random.key(1)), g(X, jax.random.key(1)))
  with pytest.raises(ValueError, match="PRNG key"):
    s(X)
  with pytest.raises(ValueError, match="stochastic=True was given for a ModelFn that is "
                                       "deterministic"):
    ModelFn.wrap(w, stochastic=True)
  with pytest.raises(TypeError, match="logits_fn must be callable"):
    ModelFn.wrap(3)
  with pytest.raises(ValueError, match="no training mode"):
    w.with_mode(True)
  assert w.with_mode(False)(X).shape == (5, 3)


def test_frozen_cuts_the_gradient(variables):
  module = Tiny()
  loss = lambda m: jnp.sum(m(X) ** 2)
  grads = jax.grad(lambda v: loss(bind(module, v)))(variables)
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["params"])) > 0
  grads = jax.grad(lambda v: loss(bind(module, v).frozen()))(variables)
  assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads))
  _close(bind(module, variables).frozen()(X), bind(module, variables)(X))
  # a wrapped function's closed-over arrays are found and cut as well
  params = variables["params"]
  wrapped = lambda p: ModelFn.wrap(lambda x: Tiny().apply({**variables, "params": p}, x))
  g = jax.grad(lambda p: jnp.sum(wrapped(p).frozen(X)(X) ** 2))(params)
  assert all(float(jnp.abs(a).sum()) == 0 for a in jax.tree.leaves(g))
  g = jax.grad(lambda p: jnp.sum(wrapped(p)(X) ** 2))(params)
  assert sum(float(jnp.abs(a).sum()) for a in jax.tree.leaves(g)) > 0
  with pytest.raises(ValueError, match="example arguments"):
    wrapped(params).frozen()


def test_model_fn_is_a_pytree(variables):
  m = bind(Tiny(), variables)
  assert len(jax.tree.leaves(m)) == len(jax.tree.leaves(variables))
  traces = []

  @jax.jit
  def run(model, x):
    traces.append(1)
    return model(x)
  _close(run(m, X), m(X))
  run(m.with_variables(jax.tree.map(lambda a: a * 1.1, variables)), X)
  assert len(traces) == 1          # variables are leaves: new values, no retrace
  zeros = jax.tree.map(jnp.zeros_like, m)
  assert isinstance(zeros, ModelFn) and zeros.module is m.module


def test_bind_errors(variables):
  with pytest.raises(TypeError, match="module must be a flax.linen Module"):
    bind(lambda x: x, variables)
  with pytest.raises(TypeError, match="variables must be the mapping"):
    bind(Tiny(), [variables])


# ------------------------------------------------------------------ run_batches
N = 13
DATA = np.random.RandomState(1).uniform(size=(N, 4, 4, 1)).astype(np.float32)
LABELS = np.arange(N, dtype=np.int32) % 3
W = np.random.RandomState(2).normal(size=(16, 3)).astype(np.float32)


def _rows(batch, key):
  """A row-independent per-example function (what the runner is for)."""
  x, y = batch
  logits = x.reshape(x.shape[0], -1) @ jnp.asarray(W)
  return {"logits": logits, "correct": jnp.argmax(logits, -1) == y}


def _expected():
  logits = DATA.reshape(N, -1) @ W
  return logits, np.argmax(logits, -1) == LABELS


@pytest.mark.parametrize("batch_size", [1, 3, 7, N, 100])
def test_runner_same_results_for_every_batch_size(batch_size):
  out = jd.data.run_batches(_rows, (DATA, LABELS), batch_size=batch_size)
  logits, correct = _expected()
  assert out["logits"].shape == (N, 3) and isinstance(out["logits"], np.ndarray)
  np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["correct"], correct)


def test_runner_keys_fold_in_the_batch_index():
  key = jax.random.key(5)
  out = jd.data.run_batches(
      lambda b, k: jnp.broadcast_to(jax.random.uniform(k, ()), b[0].shape[:1]),
      (DATA,), batch_size=3, key=key)
  want = np.repeat([float(jax.random.uniform(jax.random.fold_in(key, i), ()))
                    for i in range(5)], 3)[:N]
  np.testing.assert_allclose(out, want, rtol=1e-6)
  seen = []
  jd.data.run_batches(lambda b, k: seen.append(k) or b[0][:, 0, 0, 0], (DATA,),
                      batch_size=3, jit=False)
  assert seen == [None] * 5


def test_runner_compiles_once_and_pads_the_last_batch():
  traces, shapes = [], []

  def fn(batch, key):
    traces.append(1)
    shapes.append(batch[0].shape)
    return _rows(batch, key)
  for _ in range(2):   # 5 batches (the last one holds 1 example), two calls
    out = jd.data.run_batches(fn, (DATA, LABELS), batch_size=3)
  assert len(traces) == 1 and shapes == [(3, 4, 4, 1)]
  np.testing.assert_allclose(out["logits"], _expected()[0], rtol=1e-5, atol=1e-6)
  # the padding repeats the last real row; the padded rows' outputs are dropped
  seen = []
  jd.data.run_batches(lambda b, k: seen.append(np.asarray(b[0])) or b[0][:, 0, 0, 0],
                      (DATA,), batch_size=3, jit=False)
  assert [s.shape[0] for s in seen] == [3] * 5
  np.testing.assert_array_equal(seen[-1], np.repeat(DATA[-1:], 3, axis=0))
  # fixed_batch: a data set smaller than the batch is padded to it (one program for all)
  seen.clear()
  jd.data.run_batches(lambda b, k: seen.append(np.asarray(b[0])) or b[0][:, 0, 0, 0],
                      (DATA[:2],), batch_size=8, jit=False, fixed_batch=True)
  assert seen[0].shape[0] == 8
  seen.clear()
  jd.data.run_batches(lambda b, k: seen.append(np.asarray(b[0])) or b[0][:, 0, 0, 0],
                      (DATA[:2],), batch_size=8, jit=False)
  assert seen[0].shape[0] == 2


def test_runner_errors():
  with pytest.raises(TypeError, match="fn must be callable"):
    jd.data.run_batches(3, (DATA,), batch_size=2)
  with pytest.raises(ValueError, match="same leading length"):
    jd.data.run_batches(_rows, (DATA, LABELS[:4]), batch_size=2)
  with pytest.raises(ValueError, match="empty data set"):
    jd.data.run_batches(_rows, (DATA[:0], LABELS[:0]), batch_size=2)
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    jd.data.run_batches(_rows, (DATA, LABELS), batch_size=0)
  with pytest.raises(ValueError, match="per-example arrays"):
    jd.data.run_batches(lambda b, k: jnp.sum(b[0]), (DATA,), batch_size=2)


_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import jaxdefense as jd
    N = 13
    data = np.random.RandomState(1).uniform(size=(N, 4, 4, 1)).astype(np.float32)
    labels = np.arange(N, dtype=np.int32) % 3
    w = np.random.RandomState(2).normal(size=(16, 3)).astype(np.float32)
    traces = []
    def fn(batch, key):
      traces.append(1)
      x, y = batch
      logits = x.reshape(x.shape[0], -1) @ jnp.asarray(w)
      return {"logits": logits, "correct": jnp.argmax(logits, -1) == y}
    out = {"devices": jax.device_count()}
    for b in (1, 3, 7, N):
      traces.clear()
      r = jd.data.run_batches(fn, (data, labels), batch_size=b)
      out[str(b)] = {"logits": r["logits"].tolist(), "correct": r["correct"].tolist(),
                     "traces": len(traces)}
    print(json.dumps(out))
""")


def test_runner_same_results_on_four_devices():
  proc = run_python(["-c", _SCRIPT], host_devices=4, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 4
  logits, correct = _expected()
  for b in ("1", "3", "7", str(N)):
    np.testing.assert_allclose(np.asarray(out[b]["logits"]), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out[b]["correct"]), correct)
  # one compile per padded batch shape (4, 8, 16 on 4 devices): batch 3 reuses batch 1's
  assert [out[b]["traces"] for b in ("1", "3", "7", str(N))] == [1, 0, 1, 1]
