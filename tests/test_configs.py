"""Configs: presets, files, overrides typed by the field, unknown-key errors."""

from __future__ import annotations

import json
import textwrap

import ml_collections
import pytest

from jaxdefense import configs

PRESETS = ("demo", "digits_resnet", "fashion_mnist_resnet", "cifar10_resnet20")


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_complete_and_locked(name):
  config = configs.get(name)
  assert config.is_locked
  base_keys = set(configs._base.flatten_keys(configs.base_config()))
  assert base_keys <= set(configs._base.flatten_keys(config))
  assert name in configs.names()
  with pytest.raises(AttributeError):
    config.not_a_field = 1


def test_cifar_preset_matches_the_papers():
  c = configs.get("cifar10_resnet20")
  assert (c.model.name, c.batch_size, c.epochs) == ("resnet20", 128, 200)
  assert c.schedule.milestones == (80, 120, 160) and c.schedule.factor == 0.1
  assert c.optimizer.weight_decay == 5e-4 and not c.optimizer.decoupled_weight_decay
  assert c.augment.flip and c.augment.pad == 4


def test_overrides_are_typed_by_the_field():
  c = configs.get("demo", [
      "epochs=3", "optimizer.learning_rate=1", "augment.flip=true", "augment.pad=2",
      "schedule.milestones=5,7", "data_dir=/tmp/data", "model.step.name=euler_maruyama",
      "model.step.coef=0.2", "model.step.init_range=(0.1, 0.3)", "ensemble.size=2",
      "checkpoint.best_metric=loss"])
  assert c.epochs == 3 and isinstance(c.epochs, int)
  assert c.optimizer.learning_rate == 1.0 and isinstance(c.optimizer.learning_rate, float)
  assert c.augment.flip is True and c.augment.pad == 2
  assert c.schedule.milestones == (5, 7)
  assert c.data_dir == "/tmp/data"
  assert (c.model.step.name, c.model.step.coef) == ("euler_maruyama", 0.2)
  assert c.model.step.init_range == (0.1, 0.3)
  assert c.ensemble.size == 2 and c.checkpoint.best_metric == "loss"


@pytest.mark.parametrize("text,expected", [
    ("[1, 2]", (1, 2)), ("(3,)", (3,)), ("4", (4,)), ("()", ()), ("", ())])
def test_tuple_syntaxes(text, expected):
  assert configs.get("demo", [f"schedule.milestones={text}"]).schedule.milestones == expected


def test_mapping_overrides_and_new_model_keys():
  c = configs.get("demo", {"model.name": "mlp", "model.hidden": [64], "epochs": 4})
  assert c.model.name == "mlp" and c.model.hidden == (64,) and c.epochs == 4
  c = configs.get("demo", ["model.dropout=0.25", "objective.eps=0.03"])
  assert c.model.dropout == 0.25 and c.objective.eps == 0.03
  # keyword arguments added one after another are not taken for typos of each other
  # ("steps" is close to the "eps" added just before)
  c = configs.get("demo", ["objective.name=pgd", "objective.eps=0.03", "objective.steps=2",
                           "objective.step_size=0.01"])
  assert (c.objective.eps, c.objective.steps, c.objective.step_size) == (0.03, 2, 0.01)


@pytest.mark.parametrize("override,match", [
    ("optimiser.learning_rate=0.1", r"unknown config key 'optimiser'.*optimizer"),
    ("optimizer.learning_rat=0.1", r"unknown config key 'optimizer.learning_rat'.*"
                                   r"optimizer.learning_rate"),
    ("bath_size=3", r"unknown config key 'bath_size'.*batch_size"),
    ("model.nme=mlp", r"did you mean model.name"),
    ("objective.nmae=pgd", r"did you mean objective.name"),
    ("epochs=three", r"'epochs'.*int"),
    ("augment.flip=maybe", r"'augment.flip'.*bool"),
    ("model=resnet8", r"is a group"),
    ("no_equals_sign", r"key=value"),
])
def test_bad_overrides_are_clear_errors(override, match):
  with pytest.raises(ValueError, match=match):
    configs.get("demo", [override])


def test_mapping_override_of_wrong_type():
  with pytest.raises(TypeError, match="epochs"):
    configs.get("demo", {"epochs": "three"})


def test_unknown_config_name_lists_close_matches():
  with pytest.raises(ValueError, match=r"unknown config 'dmo'.*Did you mean 'demo'"):
    configs.get("dmo")


def test_config_files_and_search_dirs(tmp_path):
  (tmp_path / "my_run.py").write_text(textwrap.dedent("""
      from jaxdefense.configs import base_config

      def get_config(arg=None):
        c = base_config()
        c.model.name = "mlp"
        c.epochs = int(arg) if arg else 7
        return c
      """))
  (tmp_path / "partial.py").write_text(textwrap.dedent("""
      import ml_collections

      def get_config():
        return ml_collections.ConfigDict({"model": {"name": "resnet8"}, "epochs": 2})
      """))
  assert configs.get(str(tmp_path / "my_run.py")).epochs == 7
  assert configs.get(f"{tmp_path / 'my_run.py'}:3").epochs == 3
  assert configs.get("my_run", extra_dirs=[tmp_path]).model.name == "mlp"
  assert "my_run" in configs.names([tmp_path])
  partial = configs.get(str(tmp_path / "partial.py"), ["batch_size=32"])
  assert partial.epochs == 2 and partial.batch_size == 32
  assert partial.optimizer.momentum == configs.base_config().optimizer.momentum
  with pytest.raises(FileNotFoundError):
    configs.get(str(tmp_path / "missing.py"))
  (tmp_path / "bad.py").write_text("x = 1\n")
  with pytest.raises(ValueError, match="get_config"):
    configs.get(str(tmp_path / "bad.py"))


# What each config of the checkout builds (from its docstring): data set, epochs,
# validation split, the model (network, step rule, ensemble members), the objective,
# learning rate, weight decay and the learning-rate milestones (or "cosine").
_BUILT = {
    "demo": ("digits", 12, 0, "resnet8", "euler", 1, "natural", 0.1, 5e-4, "cosine"),
    "digits_resnet": ("digits", 30, 200, "resnet8", "euler", 1, "natural", 0.1, 5e-4, (15, 25)),
    "fashion_mnist_resnet": ("fashion_mnist", 30, 5000, "resnet20", "euler", 1, "natural", 0.1,
                             5e-4, (15, 25)),
    "cifar10_resnet20": ("cifar10", 200, 0, "resnet20", "euler", 1, "natural", 0.1, 5e-4,
                         (80, 120, 160)),
    "digits_enresnet": ("digits", 20, 200, "preact_resnet8", "noisy", 2, "natural", 0.1, 5e-4,
                        (10, 15)),
    "enresnet_paper": ("cifar10", 200, 5000, "preact_resnet20", "noisy", 2, "pgd", 0.1, 5e-4,
                       (80, 120, 160)),
    "in_resnet_cifar10": ("cifar10", 160, 5000, "preact_resnet110", "damped", 1, "natural",
                          0.1, 1e-4, (80, 120)),
}


def test_experiment_configs_of_the_checkout_load():
  import jaxdefense as jd   # pylint: disable=import-outside-toplevel
  from jaxdefense.dynamics import Damped, Euler, EulerMaruyama  # pylint: disable=import-outside-toplevel
  steps = {"euler": Euler(), "noisy": EulerMaruyama(coef=0.1, std="batch", at_test=True),
           "damped": Damped("relu", init_range=(0.2, 0.25))}
  objectives = {"natural": jd.objectives.Natural(),
                "pgd": jd.objectives.PGDAdversarial(eps=8 / 255, step_size=2 / 255, steps=10)}
  names = configs.names()
  assert set(_BUILT) <= set(names), sorted(set(_BUILT) - set(names))
  for name in names:
    config = configs.get(name)
    assert isinstance(config, ml_collections.ConfigDict) and config.is_locked, name
    # complete and valid as it is: validating it again changes nothing
    assert configs.validate(config.to_dict()).to_dict() == config.to_dict(), name
    assert config.dataset in jd.data.names(), name
    model = jd.training.build_model(config, 10)
    objective = jd.training.build_objective(config.objective)
    if name not in _BUILT:   # a config added later: it must at least build
      continue
    (dataset, epochs, val, net, step, members, obj, lr, wd, milestones) = _BUILT[name]
    assert (config.dataset, config.epochs, config.validation_size) == (dataset, epochs, val), name
    expected = jd.models.create(net, num_classes=10, step=steps[step],
                                normalize=jd.data.channel_stats(dataset))
    if members > 1:
      expected = jd.models.Ensemble(member=expected, size=members)
    assert model == expected, (name, model)
    assert objective == objectives[obj], (name, objective)
    assert (config.optimizer.learning_rate, config.optimizer.weight_decay) == (lr, wd), name
    if milestones == "cosine":
      assert config.schedule.name == "cosine", name
    else:
      assert config.schedule.name == "piecewise" and config.schedule.milestones == milestones


def test_validate_completes_partial_dicts_and_checks_keys():
  c = configs.validate({"dataset": "digits", "optimizer": {"learning_rate": 1}})
  assert c.optimizer.learning_rate == 1.0 and c.optimizer.momentum == 0.9
  with pytest.raises(ValueError, match=r"unknown config key 'optimizer.lr'"):
    configs.validate({"optimizer": {"lr": 0.1}})
  with pytest.raises(TypeError, match="batch_size"):
    configs.validate({"batch_size": "big"})


def test_json_round_trip():
  c = configs.get("digits_resnet", ["model.step.name=damped"])
  again = configs.validate(json.loads(c.to_json()))
  assert again == c
  assert isinstance(again.schedule.milestones, tuple)


def test_parse_value_none_placeholder():
  assert configs.get("demo", ["data_dir=none"]).data_dir is None


def test_override_with_a_mapping_replaces_a_whole_group():
  from jaxdefense import configs
  c = configs.base_config()
  out = configs.override(c, {"objective": {"name": "trades", "beta": 3.0},
                             "model.step": {"name": "damped", "kind": "lambda"},
                             "epochs": 2})
  assert out.objective.to_dict() == {"name": "trades", "beta": 3.0}
  assert out.model.step.kind == "lambda" and out.epochs == 2
  assert c.objective.to_dict() != out.objective.to_dict()   # a copy
  configs.validate(out)


def test_train_seconds_sums_step_time(tmp_path):
  import json
  from jaxdefense import training
  assert training.train_seconds(tmp_path) == 0.0
  rows = [{"kind": "train", "step": 10, "steps_per_second": 2.0},
          {"kind": "eval", "step": 10},
          {"kind": "train", "step": 30, "steps_per_second": 4.0}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{bad")
  assert training.train_seconds(tmp_path) == 10 / 2.0 + 20 / 4.0
