"""Training: builders, compiled steps, the loop, checkpoints, resume, data parallelism."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdefense as jd
from jaxdefense import configs, training
from jaxdefense.training import _run

from conftest import run_python, subprocess_env

TINY = ["model.name=mlp", "model.hidden=(32,)", "epochs=2", "batch_size=64",
        "eval_batch_size=200", "validation_size=200", "checkpoint.keep_best=true",
        "progress_bar=false", "log_every_steps=5", "schedule.name=constant",
        "optimizer.learning_rate=0.05", "augment.enabled=true", "augment.pad=1",
        "augment.flip=false"]

# The `jaxdefense demo --quick` runs (ResNet-8, 1 epoch): tests that need a ResNet use
# exactly these programs, so the persistent compilation cache compiles each only once.
DEMO_QUICK = ["epochs=1", "progress_bar=false"]


def tiny_config(*extra: str):
  return configs.get("demo", [*TINY, *extra])


def params_close(a, b, atol=0.0):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  return all(np.allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol) if atol else
             np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """One uninterrupted tiny run (mlp on digits, 2 epochs = 38 steps)."""
  workdir = tmp_path_factory.mktemp("tiny_run")
  state = training.train_and_evaluate(tiny_config(), workdir, verbose=False)
  return workdir, state


# ------------------------------------------------------------------ builders
def test_piecewise_schedule_multiplies_at_epoch_milestones():
  c = configs.get("demo", ["schedule.name=piecewise", "schedule.milestones=(2, 3)",
                           "schedule.factor=0.1", "optimizer.learning_rate=1.0"])
  s = training.build_schedule(c, steps_per_epoch=10, total_steps=50)
  got = [float(s(i)) for i in (0, 19, 20, 29, 30, 49)]
  np.testing.assert_allclose(got, [1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)


def test_cosine_and_warmup_schedules():
  c = configs.get("demo", ["schedule.name=cosine", "optimizer.learning_rate=0.5",
                           "schedule.final_factor=0.1"])
  s = training.build_schedule(c, steps_per_epoch=10, total_steps=100)
  np.testing.assert_allclose([float(s(0)), float(s(50)), float(s(100))],
                             [0.5, 0.5 * (0.1 + 0.9 * 0.5), 0.05], rtol=1e-5)
  c = configs.get("demo", ["schedule.name=constant", "schedule.warmup_epochs=1",
                           "optimizer.learning_rate=0.4"])
  s = training.build_schedule(c, steps_per_epoch=10, total_steps=100)
  np.testing.assert_allclose([float(s(0)), float(s(5)), float(s(10)), float(s(60))],
                             [0.0, 0.2, 0.4, 0.4], rtol=1e-6)


def _run_optimizer(tx, params, grads_seq):
  state = tx.init(params)
  for g in grads_seq:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_weight_decay_is_pytorchs(nesterov):
  """Coupled decay: g + wd p before momentum (torch.optim.SGD, dampening 0)."""
  lr, mu, wd = 0.1, 0.9, 5e-4
  c = configs.get("demo", ["schedule.name=constant", f"optimizer.learning_rate={lr}",
                           f"optimizer.momentum={mu}", f"optimizer.weight_decay={wd}",
                           f"optimizer.nesterov={nesterov}"])
  tx = training.build_optimizer(c, training.build_schedule(c, 1, 10))
  rng = np.random.default_rng(0)
  p0 = rng.normal(size=(5,)).astype(np.float32)
  grads = [rng.normal(size=(5,)).astype(np.float32) for _ in range(4)]
  p, buf = p0.astype(np.float64), np.zeros(5)
  for g in grads:
    d = g + wd * p
    buf = mu * buf + d
    p = p - lr * ((d + mu * buf) if nesterov else buf)
  got = _run_optimizer(tx, jnp.asarray(p0), [jnp.asarray(g) for g in grads])
  np.testing.assert_allclose(np.asarray(got), p, rtol=1e-5, atol=1e-6)
  # Decoupled: p <- p - lr * (buf + wd * p), buf from the raw gradients.
  c2 = configs.override(c, ["optimizer.decoupled_weight_decay=true"])
  tx2 = training.build_optimizer(c2, training.build_schedule(c2, 1, 10))
  p, buf = p0.astype(np.float64), np.zeros(5)
  for g in grads:
    buf = mu * buf + g
    p = p - lr * (((g + mu * buf) if nesterov else buf) + wd * p)
  got = _run_optimizer(tx2, jnp.asarray(p0), [jnp.asarray(g) for g in grads])
  np.testing.assert_allclose(np.asarray(got), p, rtol=1e-5, atol=1e-6)


def test_adamw_matches_optax():
  c = configs.get("demo", ["optimizer.name=adamw", "schedule.name=constant",
                           "optimizer.learning_rate=0.01", "optimizer.weight_decay=0.1"])
  tx = training.build_optimizer(c, training.build_schedule(c, 1, 10))
  ref = optax.adamw(0.01, weight_decay=0.1)
  p0 = jnp.arange(4.0)
  grads = [jnp.ones(4) * k for k in (1.0, -2.0, 0.5)]
  np.testing.assert_allclose(_run_optimizer(tx, p0, grads), _run_optimizer(ref, p0, grads),
                             rtol=1e-6)


def test_build_model_and_step_rules():
  c = configs.get("demo", ["model.step.name=euler_maruyama", "model.step.coef=0.2",
                           "ensemble.size=3", "ensemble.shared=true"])
  model = training.build_model(c, 10)
  assert isinstance(model, jd.models.Ensemble) and model.size == 3 and model.shared
  assert model.member.step == jd.dynamics.EulerMaruyama(coef=0.2)
  assert model.member.normalize == jd.data.channel_stats("digits")
  # an older, complete spec: another rule's field at its default is accepted
  step = training.build_step({"name": "damped", "kind": "sig", "coef": 0.1})
  assert step == jd.dynamics.Damped(kind="sig")
  with pytest.raises(ValueError, match="'coef' .*does not apply to step 'damped'"):
    training.build_step({"name": "damped", "kind": "sig", "coef": 0.3})
  with pytest.raises(ValueError, match="has no residual step"):
    training.build_model(configs.get("demo", ["model.name=mlp",
                                              "model.step.name=euler_maruyama"]), 10)
  with pytest.raises(ValueError, match="unknown model.step.name='rk4'"):
    training.build_step({"name": "rk4"})
  with pytest.raises(ValueError, match="model.step field 'sigma' does not apply"):
    training.build_step({"name": "euler", "sigma": 1.0})
  with pytest.raises(ValueError, match="unknown model name='resnet9'"):
    training.build_model(configs.get("demo", ["model.name=resnet9"]), 10)
  with pytest.raises(ValueError, match="num_classes"):
    training.build_model(configs.get("demo", ["model.num_classes=7"]), 10)


def test_train_state_is_a_pytree_with_static_functions():
  c = tiny_config()
  exp = training.build_experiment(c, num_classes=10, image_shape=(8, 8, 1),
                                  steps_per_epoch=19)
  state = exp.init_state(jd.data.make_mesh())
  leaves = jax.tree_util.tree_leaves(state)
  assert all(isinstance(x, jax.Array) for x in leaves)
  assert state.step.dtype == jnp.int32 and int(state.step) == 0
  assert state.model_state == {} and state.batch_stats == {}
  doubled = jax.tree_util.tree_map(lambda x: x * 2, state)
  assert doubled.apply_fn is state.apply_fn and doubled.tx is state.tx


def test_a_fresh_state_traces_the_model_initialiser_once(monkeypatch):
  """``init_state`` then ``state_sharding`` / ``abstract_state`` (what the training loop
  asks for) trace ``model.init`` once, and the abstract state matches the real one."""
  from jaxdefense.training import _experiment
  traces = []
  real = _experiment.create_train_state
  monkeypatch.setattr(_experiment, "create_train_state",
                      lambda *a: traces.append(1) or real(*a))
  exp = training.build_experiment(tiny_config(), num_classes=10, image_shape=(8, 8, 1),
                                  steps_per_epoch=19)
  mesh = jd.data.make_mesh()
  state = exp.init_state(mesh)
  shardings, abstract = exp.state_sharding(mesh), exp.abstract_state(mesh)
  assert len(traces) == 1
  for a, s, sh in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(abstract),
                      jax.tree_util.tree_leaves(shardings)):
    assert (a.shape, a.dtype) == (s.shape, s.dtype) and a.sharding == s.sharding == sh
  fresh = training.build_experiment(tiny_config(), num_classes=10, image_shape=(8, 8, 1),
                                    steps_per_epoch=19)   # no state yet: eval_shape, once
  shapes = [(s.shape, s.dtype, s.sharding) for s in jax.tree_util.tree_leaves(abstract)]
  assert [(s.shape, s.dtype, s.sharding)
          for s in jax.tree_util.tree_leaves(fresh.abstract_state(mesh))] == shapes
  fresh.state_sharding(mesh)
  assert len(traces) == 2


def test_learning_rate_at_is_one_program_per_schedule():
  """The logged learning rate: the schedule's values, from one compiled program (not
  one eager op at a time, each its own program on a run's first log line)."""
  import optax
  from jaxdefense.training import _build
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, 0.1, 5), optax.cosine_decay_schedule(0.1, 20)], [5])
  values = [_build.learning_rate_at(schedule, s) for s in range(0, 25, 3)]
  np.testing.assert_allclose(values, [float(schedule(s)) for s in range(0, 25, 3)],
                             rtol=1e-6)
  compiled = _build._COMPILED_SCHEDULES[schedule]
  assert compiled._cache_size() == 1

  class Slotted:   # a schedule object without weak references still works
    __slots__ = ()

    def __call__(self, count):
      return 0.5 * count
  assert _build.learning_rate_at(Slotted(), 3) == 1.5


# ----------------------------------------------------------------- steps
def _counting(objective, calls):
  def counted(model, x, y, key):
    calls.append(1)
    return objective(model, x, y, key)
  return counted


def test_train_step_compiles_once_noise_and_batch_stats():
  """EnResNet-8 (the quick demo's): one trace over several steps; state advances."""
  c = configs.get("demo", [*DEMO_QUICK, "model.step.name=euler_maruyama"])
  ds = jd.data.load("digits", "train")
  spe = jd.data.num_batches(len(ds.labels), c.batch_size)
  exp = training.build_experiment(c, num_classes=10, image_shape=(8, 8, 1),
                                  steps_per_epoch=spe)
  mesh = jd.data.make_mesh()
  state = exp.init_state(mesh)
  calls = []
  step = training.make_train_step(_counting(exp.objective, calls), mesh=mesh)
  stats0 = jax.device_get(state.batch_stats)
  losses = []
  for x, y in list(jd.data.batches(ds, c.batch_size, seed=0, epoch=0))[:4]:
    xb, yb = jd.data.shard_batch((x, y), jd.data.batch_sharding(mesh))
    state, metrics = step(state, xb, yb)
    losses.append(float(metrics["loss"]) / c.batch_size)
  assert step.traces == 1 and len(calls) == 1
  assert int(state.step) == 4 and np.all(np.isfinite(losses))
  assert not params_close(stats0, jax.device_get(state.batch_stats))
  # Evaluation: stochastic model, fixed eval key -> deterministic; one compile for
  # two data sets of different sizes (padded last batches).
  eval_step = training.make_eval_step(mesh)
  test = jd.data.load("digits", "test")
  val = jd.data.load("digits", "validation", validation_size=150)
  r1 = training.evaluate(state, test, c.eval_batch_size, mesh=mesh, eval_step=eval_step)
  r2 = training.evaluate(state, test, c.eval_batch_size, mesh=mesh, eval_step=eval_step)
  r3 = training.evaluate(state, val, c.eval_batch_size, mesh=mesh, eval_step=eval_step)
  assert r1 == r2 and r1["count"] == 360 and r3["count"] == 150
  assert eval_step.traces == 1
  # The noise is really drawn at test time: another root key changes the predictions.
  other = state.replace(key=jax.random.PRNGKey(1))
  assert training.evaluate(other, test, c.eval_batch_size, mesh=mesh,
                           eval_step=eval_step)["loss"] != r1["loss"]


def test_objective_must_return_logits_and_model_state():
  exp = training.build_experiment(configs.get("demo"), num_classes=10,
                                  image_shape=(8, 8, 1), steps_per_epoch=10)
  mesh = jd.data.make_mesh()
  state = exp.init_state(mesh)

  def no_state(model, x, y, key):
    logits, _ = model.apply(x)
    return jnp.mean(logits), {"logits": logits}

  step = training.make_train_step(no_state, mesh=mesh, donate=False)
  x = np.zeros((8, 8, 8, 1), np.float32)
  y = np.zeros((8,), np.int32)
  with pytest.raises(ValueError, match="model_state"):
    step(state, x, y)


def test_eval_mode_objectives_attack_the_evaluation_mode_model():
  """The step's model is the training-mode ModelFn with the current parameters and the
  state's batch statistics; ``with_mode(False)`` (what attack_mode="eval" objectives such
  as TRADES attack) is the evaluation-mode model."""
  import dataclasses
  exp = training.build_experiment(configs.get("demo"), num_classes=10,
                                  image_shape=(8, 8, 1), steps_per_epoch=10)
  mesh = jd.data.make_mesh()
  state = exp.init_state(mesh)
  # non-trivial running statistics, so train-mode and eval-mode outputs differ
  state = state.replace(model_state=jax.tree_util.tree_map(
      lambda v: v + 0.5, state.model_state))
  x = np.random.RandomState(0).uniform(size=(8, 8, 8, 1)).astype(np.float32)
  y = np.zeros((8,), np.int32)
  variables = {"params": state.params, **state.model_state}
  expected = state.apply_fn(variables, x, train=False)
  in_train_mode = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])[0]
  assert float(jnp.max(jnp.abs(expected - in_train_mode))) > 1e-3

  @dataclasses.dataclass(frozen=True)
  class Probe:
    attack_mode: str = "eval"

    def __call__(self, model, x, y, key):
      assert isinstance(model, jd.models.ModelFn) and model.train
      logits, model_state = model.apply(x)
      seen = model.with_mode(False)(x) if self.attack_mode == "eval" else logits
      return jnp.mean(logits), {"logits": logits, "model_state": model_state,
                                "attack_sum": jnp.sum(seen)}

  for mode, reference in (("eval", expected), ("train", in_train_mode)):
    step = training.make_train_step(Probe(mode), mesh=mesh, donate=False)
    _, metrics = step(state, x, y)
    np.testing.assert_allclose(float(metrics["attack_sum"]) / 8, float(jnp.sum(reference)),
                               rtol=1e-4)


# ----------------------------------------------------------------- the loop
def test_train_and_evaluate_writes_metrics_checkpoints_and_restores(tiny_run, capsys):
  workdir, state = tiny_run
  records = training.read_metrics(workdir / "metrics.jsonl")
  kinds = [r["kind"] for r in records]
  assert kinds.count("epoch") == 2 and kinds[-1] == "final" and "train" in kinds
  final = records[-1]
  assert final["step"] == 38 and final["train_step_traces"] == 1
  assert final["eval_step_traces"] == 1
  assert final["test/accuracy"] > 0.6 and final["validation/count"] == 200
  assert (workdir / "config.json").is_file()
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit())[-1] == 38
  restored, config = training.restore(workdir)
  assert config == tiny_config()
  assert int(restored.step) == 38 and params_close(restored.params, state.params)
  best, _ = training.restore(workdir, which="best")
  assert int(best.step) in (19, 38)
  rows = training.evaluate_checkpoint(workdir, splits=("validation", "test"))
  assert [r["split"] for r in rows] == ["validation", "test"]
  assert rows[1]["accuracy"] == pytest.approx(final["test/accuracy"])
  # Running the finished run again only evaluates, and prints the table.
  again = training.train_and_evaluate(tiny_config(), workdir)
  out = capsys.readouterr().out
  assert "resuming" in out or "test" in out
  assert "accuracy" in out and "validation" in out
  assert params_close(again.params, state.params)


def test_resume_after_an_interrupt_is_exact(tiny_run, tmp_path, monkeypatch):
  _, reference = tiny_run
  real_batches = jd.data.batches
  seen = []

  def failing_batches(*args, **kwargs):
    for b in real_batches(*args, **kwargs):
      if len(seen) == 25:
        raise KeyboardInterrupt("simulated interruption")
      seen.append(1)
      yield b

  config = tiny_config("checkpoint.every_steps=3")
  monkeypatch.setattr(_run._data, "batches", failing_batches)
  with pytest.raises(KeyboardInterrupt):
    training.train_and_evaluate(config, tmp_path, verbose=False)
  monkeypatch.setattr(_run._data, "batches", real_batches)
  assert training.Checkpoints(tmp_path).latest_step() == 24
  state = training.train_and_evaluate(config, tmp_path, verbose=False)
  assert int(state.step) == 38
  assert params_close(state.params, reference.params)
  assert params_close(state.opt_state, reference.opt_state)
  steps = [r["step"] for r in training.read_metrics(tmp_path / "metrics.jsonl")
           if r["kind"] == "train"]
  assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tiny_run, tmp_path):
  _, reference = tiny_run
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "jaxdefense", "train", "--config", "demo", "--workdir",
         str(workdir), *[f"--config.{o}" for o in TINY], "--config.checkpoint.every_steps=1",
         "--compile_cache", os.environ["JAX_COMPILATION_CACHE_DIR"]]
  proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  ckpts = workdir / "checkpoints"
  deadline = time.time() + 240
  killed_at = None
  while time.time() < deadline and proc.poll() is None:
    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] \
        if ckpts.is_dir() else []
    if steps and max(steps) >= 3:
      os.kill(proc.pid, signal.SIGKILL)
      killed_at = max(steps)
      break
    time.sleep(0.005)
  proc.wait(timeout=60)
  out = proc.stdout.read().decode()
  assert killed_at is not None, f"run ended before it could be killed:\n{out}"
  latest = training.Checkpoints(workdir).latest_step()
  assert latest is not None and latest < 38, "the kill came too late to test resuming"
  result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert f"resuming {workdir}" in result.stdout + result.stderr
  state, _ = training.restore(workdir)
  assert int(state.step) == 38
  assert params_close(state.params, reference.params)
  assert params_close(state.opt_state, reference.opt_state)


MULTI = [*DEMO_QUICK, "checkpoint.every_steps=4", "checkpoint.max_to_keep=10"]

_MULTI_SCRIPT = """
import sys, numpy as np, jax
import jaxdefense as jd
assert jax.device_count() == 4, jax.devices()
overrides = sys.argv[2:]
try:
  jd.training.train_and_evaluate(jd.configs.get("demo", overrides + ["batch_size=30"]),
                                 sys.argv[1] + "_bad", verbose=False)
  raise SystemExit("no error for batch_size=30 on 4 devices")
except ValueError as e:
  assert "not divisible by the number of devices the batch is split over (4" in str(e), e
  print("divisibility error ok")
state = jd.training.train_and_evaluate(jd.configs.get("demo", overrides), sys.argv[1],
                                       verbose=False)
print("sharding", state.params["Dense_0"]["kernel"].sharding)
"""


def test_four_host_devices_match_one_device(tmp_path):
  """ResNet-8 (train-mode batch norm over the sharded batch): 4 CPU devices = 1."""
  script = tmp_path / "multi.py"
  script.write_text(textwrap.dedent(_MULTI_SCRIPT))
  result = run_python([str(script), str(tmp_path / "four"), *MULTI], host_devices=4)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "divisibility error ok" in result.stdout
  assert "spec=P()" in result.stdout  # parameters replicated
  training.train_and_evaluate(configs.get("demo", MULTI), tmp_path / "one", verbose=False)
  for step in (4, 22):
    one, _ = training.restore(tmp_path / "one", step=step)
    four, _ = training.restore(tmp_path / "four", step=step)
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(one.params)),
                    jax.tree_util.tree_leaves(jax.device_get(four.params))):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  records = training.read_metrics(tmp_path / "four" / "metrics.jsonl")
  assert records[-1]["devices"] == 4 and records[-1]["train_step_traces"] == 1


MEMBERS = ["ensemble.size=4", "model.stem_width=4", "model.widths=(4, 8, 8)",
           "num_train_steps=6", "batch_size=32", "eval_batch_size=96",
           "train_size=192", "validation_size=96", "progress_bar=false",
           "log_every_steps=2", "checkpoint.keep_best=false"]

_MEMBER_SCRIPT = """
import json, sys, numpy as np, jax
import jaxdefense as jd
assert jax.device_count() == 4, jax.devices()
out = {}
for k in (1, 2, 4):
  config = jd.configs.get("demo", sys.argv[2:] + [f"ensemble.member_devices={k}"])
  state = jd.training.train_and_evaluate(config, f"{sys.argv[1]}/k{k}", verbose=False)
  leaf = state.params["member"]["Dense_0"]["kernel"]
  out[k] = {"spec": str(leaf.sharding.spec),
            "shard_rows": int(leaf.addressable_shards[0].data.shape[0]),
            "params": [np.asarray(a).tolist() for a in
                       jax.tree_util.tree_leaves(jax.device_get(state.params))[:3]],
            "metrics": jd.training.read_metrics(f"{sys.argv[1]}/k{k}/metrics.jsonl")[-1]}
for bad, words in ((3, "member_devices"), (8, "member_devices")):
  try:
    jd.training.train_and_evaluate(jd.configs.get(
        "demo", sys.argv[2:] + [f"ensemble.member_devices={bad}"]), f"{sys.argv[1]}/bad{bad}",
        verbose=False)
    raise SystemExit(f"no error for member_devices={bad}")
  except ValueError as e:
    assert words in str(e), e
try:
  jd.training.train_and_evaluate(jd.configs.get(
      "demo", sys.argv[2:] + ["ensemble.size=1", "ensemble.member_devices=2"]),
      f"{sys.argv[1]}/single", verbose=False)
  raise SystemExit("no error for a single model")
except ValueError as e:
  assert "not an ensemble" in str(e), e
print("RESULT" + json.dumps(out))
"""


def test_ensemble_members_split_over_devices(tmp_path):
  """An En4 trained with its members split over 1, 2 and 4 of 4 host devices ends with
  the same parameters and metrics; each device holds size / k members; the
  checkpoint restores on one device (another device count) with the same accuracy."""
  script = tmp_path / "members.py"
  script.write_text(textwrap.dedent(_MEMBER_SCRIPT))
  result = run_python([str(script), str(tmp_path), *MEMBERS], host_devices=4)
  assert result.returncode == 0, result.stdout + result.stderr
  out = json.loads(result.stdout.split("RESULT", 1)[1])
  assert out["1"]["spec"] == "P()" and out["1"]["shard_rows"] == 4
  assert out["2"]["spec"] == "P('member',)" and out["2"]["shard_rows"] == 2
  assert out["4"]["spec"] == "P('member',)" and out["4"]["shard_rows"] == 1
  for k in ("2", "4"):
    for a, b in zip(out["1"]["params"], out[k]["params"]):
      # the batch is split 4, 2 and 1 ways: sums in another order, float rounding only
      np.testing.assert_allclose(a, b, rtol=5e-5, atol=5e-5)
    for name in ("train/loss", "validation/loss", "validation/accuracy", "test/accuracy"):
      assert abs(out["1"]["metrics"][name] - out[k]["metrics"][name]) < 1e-4, name
  state, _ = training.restore(tmp_path / "k4")
  assert state.params["member"]["Dense_0"]["kernel"].shape[0] == 4
  [row] = training.evaluate_checkpoint(tmp_path / "k4", splits=("test",))
  assert abs(row["accuracy"] - out["4"]["metrics"]["test/accuracy"]) < 1e-6


BF16 = ["model.name=resnet8", "epochs=3", "batch_size=64", "eval_batch_size=200",
        "validation_size=200", "progress_bar=false", "log_every_steps=5",
        "checkpoint.keep_best=false", "augment.enabled=false",
        "objective.name=pgd", "objective.eps=0.03", "objective.step_size=0.015",
        "objective.steps=2"]


def test_bfloat16_training_matches_float32_accuracy(tmp_path):
  """compute_dtype=bfloat16 (PGD-AT, so the attacks run in it too) trains ResNet-8 on
  digits to the accuracy of the float32 run; parameters and batch statistics stay
  float32 in the state and the checkpoint."""
  runs = {}
  for dtype in ("float32", "bfloat16"):
    state = training.train_and_evaluate(configs.get("demo", [*BF16, f"compute_dtype={dtype}"]),
                                        tmp_path / dtype, verbose=False)
    leaves = jax.tree_util.tree_leaves((state.params, state.model_state, state.opt_state))
    assert {a.dtype for a in leaves if jnp.issubdtype(a.dtype, jnp.floating)} == {
        jnp.dtype("float32")}
    runs[dtype] = training.read_metrics(tmp_path / dtype / "metrics.jsonl")[-1]
  full, half = runs["float32"], runs["bfloat16"]
  assert full["validation/accuracy"] > 0.8, full  # the run itself learns
  assert abs(full["validation/accuracy"] - half["validation/accuracy"]) <= 0.05, (full, half)
  assert abs(full["train/loss"] - half["train/loss"]) <= 0.15, (full, half)


# ------------------------------------------------------------- reliability
def test_corrupt_checkpoint_is_a_clear_error(tiny_run, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(tiny_run[0], workdir)
  state_dir = workdir / "checkpoints" / "38" / "state"
  files = [p for p in state_dir.rglob("*") if p.is_file()]
  assert files
  for p in files:
    p.write_bytes(b"\x00garbage" * 8)
  with pytest.raises(training.CheckpointError, match="corrupt"):
    training.restore(workdir)
  with pytest.raises(training.CheckpointError, match="checkpoints/38"):
    training.train_and_evaluate(tiny_config(), workdir, verbose=False)


def test_checkpoint_of_another_model_is_a_clear_error(tiny_run, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(tiny_run[0], workdir)
  with pytest.raises(training.CheckpointError, match="does not match"):
    training.train_and_evaluate(tiny_config("model.hidden=(16,)"), workdir, verbose=False)


def test_restore_without_checkpoints(tmp_path):
  with pytest.raises(FileNotFoundError, match="no latest checkpoints"):
    training.restore(tmp_path)


def test_nan_loss_stops_with_a_clear_message(tmp_path):
  config = tiny_config("optimizer.learning_rate=1e30", "log_every_steps=1")
  with pytest.raises(training.NonFiniteLossError, match="loss became"):
    training.train_and_evaluate(config, tmp_path, verbose=False)
  assert training.Checkpoints(tmp_path).latest_step() is None


@pytest.mark.parametrize("override,match", [
    ("dataset=cifar11", "cifar11"),
    ("model.name=resnet9", "resnet9"),
    ("batch_size=5000", "larger than"),
])
def test_bad_configs_fail_before_training(tmp_path, override, match):
  with pytest.raises(ValueError, match=match):
    training.train_and_evaluate(tiny_config(override), tmp_path, verbose=False)


def test_train_size_trains_on_a_prefix_of_the_training_split(tmp_path):
  config = tiny_config("train_size=256", "epochs=1")
  state = training.train_and_evaluate(config, tmp_path, verbose=False)
  assert int(state.step) == 256 // 64  # 4 batches of 64 from the 256 examples
  rows = training.evaluate_checkpoint(tmp_path, splits=("train",))
  assert rows[0]["examples"] == 256
  with pytest.raises(ValueError, match="train_size"):
    training.train_and_evaluate(tiny_config("train_size=-1"), tmp_path / "bad", verbose=False)


def test_step_rate_leaves_out_compilation_saves_and_evaluation(tmp_path):
  """``steps_per_second`` (and so ``train_seconds``) times training steps only: the
  first window, which pays the compilation, runs at the rate of the others."""
  old = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)   # a real compile
  try:
    training.train_and_evaluate(tiny_config("log_every_steps=5",
                                            "checkpoint.every_steps=10"), tmp_path,
                                verbose=False)
  finally:
    jax.config.update("jax_enable_compilation_cache", old)
  rates = [r["steps_per_second"] for r in training.read_metrics(tmp_path / "metrics.jsonl")
           if r.get("kind") == "train" and "steps_per_second" in r]
  assert len(rates) >= 6
  median = float(np.median(rates[1:]))
  assert rates[0] > median / 5, rates
  steps = 38
  assert training.train_seconds(tmp_path) < steps / median * 3
