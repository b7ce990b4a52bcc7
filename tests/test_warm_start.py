"""Warm start (``init.from_workdir``): the In-ResNet authors' "pretrain", a ResNet's weights
starting a damped network whose coefficients keep their initial values."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

import jaxdefense as jd
from jaxdefense.data import _sharding

TINY = {"name": "preact_resnet8", "stage_sizes": (2, 1, 1), "widths": (4, 8, 8),
        "normalize": False}


def _config(step=None, **over):
  c = jd.configs.get("demo")
  c.model = dict(TINY, step=step or {"name": "euler"})
  c.epochs, c.batch_size, c.eval_batch_size, c.validation_size = 1, 64, 200, 200
  c.train_size, c.progress_bar, c.schedule.name = 256, False, "constant"
  c.checkpoint.keep_best = True
  for k, v in over.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return jd.configs.validate(c)


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("resnet")
  jd.training.train_and_evaluate(_config(), workdir)
  return workdir


def _flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _fresh_state(config):
  exp = jd.training.build_experiment(config, num_classes=10, image_shape=(8, 8, 1),
                                     steps_per_epoch=4)
  return exp.init_state(_sharding.make_mesh())


def test_resnet_weights_start_a_damped_network_and_the_damping_keeps_its_init(resnet_run):
  source, _ = jd.training.restore(resnet_run, which="best")
  fresh = _fresh_state(_config({"name": "damped", "kind": "relu"}))
  state, summary = jd.training.warm_start(fresh, str(resnet_run), "best")
  got, src, init = _flat(state.params), _flat(source.params), _flat(fresh.params)
  damping = [p for p in got if p not in src]
  assert damping == ["block1/k"], damping    # relu kind: the authors' k, lambda = relu(1 - k)
  assert set(summary.kept) == {f"params/{p}" for p in damping} and not summary.unused
  for p, v in got.items():
    np.testing.assert_array_equal(v, src[p] if p in src else init[p], err_msg=p)
  stats, src_stats = _flat(state.model_state), _flat(source.model_state)
  assert stats and set(stats) == set(src_stats)       # batch statistics come along
  for p, v in stats.items():
    np.testing.assert_array_equal(v, src_stats[p], err_msg=p)
  assert int(state.step) == 0 and summary.step == int(source.step)
  assert "arrays copied" in summary.describe() and "kept at their initial" in summary.describe()


def test_the_run_starts_from_the_source_and_a_resume_does_not_warm_start_again(resnet_run,
                                                                               tmp_path):
  source, _ = jd.training.restore(resnet_run, which="best")
  cfg = _config({"name": "damped", "kind": "lambda"}, **{
      "init.from_workdir": str(resnet_run), "optimizer.learning_rate": 0.0,
      "optimizer.weight_decay": 0.0, "num_train_steps": 2})
  state = jd.training.train_and_evaluate(cfg, tmp_path / "damped")
  src = _flat(source.params)
  for p, v in _flat(state.params).items():   # lr 0: still the copied weights
    if p in src:
      np.testing.assert_array_equal(v, src[p], err_msg=p)
  assert "init" in jd.training.restore(tmp_path / "damped")[1]
  # A second call resumes from the run's own checkpoint (step 2), not the source.
  state2 = jd.training.train_and_evaluate(cfg, tmp_path / "damped")
  assert int(state2.step) == 2


def test_bad_sources_are_clear_errors(resnet_run, tmp_path):
  fresh = _fresh_state(_config())
  with pytest.raises(ValueError, match="init.which must be one of"):
    jd.training.warm_start(fresh, str(resnet_run), "last")
  wide = _fresh_state(_config(**{"model.widths": (4, 8, 16)}))
  with pytest.raises(ValueError, match=r"other shapes.*\(8,\) in the source, \(16,\) here"):
    jd.training.warm_start(wide, str(resnet_run))
  mlp = jd.training.build_experiment(_config(**{"model": {"name": "mlp", "hidden": (8,)}}),
                                     num_classes=10, image_shape=(8, 8, 1),
                                     steps_per_epoch=4).init_state(_sharding.make_mesh())
  with pytest.raises(ValueError, match=r"Dense_0/kernel: \(8, 10\) in the source, \(64, 8\)"):
    jd.training.warm_start(mlp, str(resnet_run))
  other = fresh.replace(params={"head": {"w": jax.numpy.zeros(3)}}, model_state={})
  with pytest.raises(ValueError, match="no array of this model exists in the source"):
    jd.training.warm_start(other, str(resnet_run))
  with pytest.raises(FileNotFoundError):
    jd.training.warm_start(fresh, str(tmp_path / "nothing"))


@pytest.mark.parametrize("key, value", [("init.which", "worst"),
                                        ("checkpoint.best_metric", "acc")])
def test_choice_fields_are_checked_when_the_config_is_validated(key, value):
  with pytest.raises(ValueError, match=f"config key '{key}' must be one of .* got '{value}'"):
    _config(**{key: value})
