"""The command line's errors: a bad input is one line on stderr and exit status 2.

Every case here fails before any training or compilation (flags are checked at parse
time, configs when they are loaded, certifiability by tracing only).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import types

import jax
import jax.numpy as jnp
import pytest

from jaxdefense import commands, configs, training
from jaxdefense.commands import _base, _main
from jaxdefense.commands import certify as certify_cmd
from jaxdefense.commands.demo import run_demo

from conftest import run_python, subprocess_env


def run_main(*argv: str) -> int:
  return commands.main([*argv, "--compile_cache", os.environ["JAX_COMPILATION_CACHE_DIR"]])


def exit_and_error(capsys, *argv: str) -> tuple[int, str]:
  """Run the command line, expecting an error exit; its status and its one stderr line."""
  with pytest.raises(SystemExit) as e:
    run_main(*argv)
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert "Traceback" not in err
  return e.value.code, lines[0]


# ------------------------------------------------------------ flags, at parse time
@pytest.mark.parametrize("argv,flag,value", [
    (["eval", "--workdir", "W", "--batch_size", "0"], "--batch_size", "'0'"),
    (["certify", "--workdir", "W", "--batch_size", "0"], "--batch_size", "'0'"),
    (["certify", "--workdir", "W", "--num_examples", "-5"], "--num_examples", "'-5'"),
    (["certify", "--workdir", "W", "--pgd_steps", "-1"], "--pgd_steps", "'-1'"),
    (["certify", "--workdir", "W", "--relu_budget", "0"], "--relu_budget", "'0'"),
    (["demo", "--epochs", "-1"], "--epochs", "'-1'"),
    (["demo", "--epochs", "two"], "--epochs", "'two'"),
    (["config", "--list", "--host_devices", "0"], "--host_devices", "'0'"),
    (["config", "--list", "--num_processes", "0"], "--num_processes", "'0'"),
    (["config", "--list", "--process_id", "-1"], "--process_id", "'-1'"),
])
def test_bad_flag_values_are_usage_errors_naming_the_flag(capsys, tmp_path, argv, flag,
                                                          value):
  argv = [str(tmp_path / "run") if a == "W" else a for a in argv]
  code, line = exit_and_error(capsys, *argv)
  assert code == 2
  assert line.startswith(f"jaxdefense {argv[0]}: error: argument {flag}: ")
  assert f"got {value}" in line and "integer >=" in line
  assert not (tmp_path / "run").exists()


def test_int_flag_types():
  assert _base.positive_int("3") == 3 and _base.non_negative_int("0") == 0
  at_least_2 = _base.int_at_least(2, "two or more")
  assert at_least_2("2") == 2
  for bad in ("1", "-4", "2.5", ""):
    with pytest.raises(argparse.ArgumentTypeError,
                       match=r"expected an integer >= 2 \(two or more\); got"):
      at_least_2(bad)
  with pytest.raises(TypeError, match="minimum must be an int"):
    _base.int_at_least(1.0)


def test_usage_errors_are_one_line(capsys, tmp_path):
  code, line = exit_and_error(capsys, "train", "--config", "demo")
  assert code == 2 and line.startswith("jaxdefense train: error: ")
  assert "--workdir" in line and "jaxdefense train --help" in line
  code, line = exit_and_error(capsys, "train", "--config", "demo", "--workdir",
                              str(tmp_path), "--bogus")
  assert code == 2 and "unrecognized arguments for 'train': --bogus" in line
  code, line = exit_and_error(capsys, "no_such_command")
  assert code == 2 and line.startswith("jaxdefense: error: ") and "'no_such_command'" in line


# ------------------------------------------------------- config values and keys
def test_config_errors_name_the_config_key(capsys, tmp_path):
  workdir = tmp_path / "run"
  train = ("train", "--config", "demo", "--workdir", str(workdir))
  code, line = exit_and_error(capsys, *train, "--config.epochs.x=3")
  assert code == 2 and "'epochs' is a value (an int, currently 12), not a group" in line
  assert "Close matches" not in line and "set it as epochs=VALUE" in line
  code, line = exit_and_error(capsys, *train, "--config.epochs=-1")
  assert code == 2 and line == ("jaxdefense train: error: config key 'epochs' must be >= 1 "
                                "(the run length in epochs; or set num_train_steps > 0); "
                                "got -1.")
  code, line = exit_and_error(capsys, *train, "--config.eval_batch_size=0")
  assert code == 2 and "config key 'eval_batch_size' must be >= 1; got 0." in line
  code, line = exit_and_error(capsys, "demo", "--workdir", str(workdir), "--config.epochs=0")
  assert code == 2 and "config key 'epochs' must be >= 1" in line
  code, line = exit_and_error(capsys, *train, "--config.optimizer.learning_rat=0.1")
  assert code == 2 and "unknown config key 'optimizer.learning_rat'" in line
  assert not workdir.exists()  # nothing was trained or written


@pytest.mark.parametrize("override,match", [
    ("epochs=-1", r"'epochs' must be >= 1 .*got -1"),
    ("epochs=0", r"'epochs' must be >= 1 .*got 0"),
    ("batch_size=0", r"'batch_size' must be >= 1; got 0"),
    ("eval_batch_size=-3", r"'eval_batch_size' must be >= 1; got -3"),
    ("train_size=-1", r"'train_size' must be >= 0; got -1"),
    ("validation_size=-10", r"'validation_size' must be >= 0; got -10"),
    ("seed=-1", r"'seed' must be >= 0; got -1"),
    ("ensemble.size=0", r"'ensemble.size' must be >= 1; got 0"),
    ("augment.pad=-1", r"'augment.pad' must be >= 0; got -1"),
    ("checkpoint.max_to_keep=0", r"'checkpoint.max_to_keep' must be >= 1; got 0"),
    ("log_every_steps=-5", r"'log_every_steps' must be >= 0; got -5"),
    ("optimizer.learning_rate=nan", r"'optimizer.learning_rate' must be finite; got nan"),
    ("optimizer.momentum=1.5", r"'optimizer.momentum' must be <= 1.0; got 1.5"),
    ("schedule.warmup_epochs=-1", r"'schedule.warmup_epochs' must be >= 0.0; got -1.0"),
    ("data_dir.sub=x", r"'data_dir' is a value \(currently None\), not a group"),
    ("optimizer.momentum.x=1", r"'optimizer.momentum' is a value \(a float, currently"),
])
def test_config_values_are_checked_where_configs_are_validated(override, match):
  with pytest.raises(ValueError, match=match):
    configs.get("demo", [override])


def test_config_range_checks_keep_valid_values():
  c = configs.get("demo", ["epochs=0", "num_train_steps=5", "train_size=0",
                           "log_every_steps=0", "optimizer.momentum=0"])
  assert c.epochs == 0 and c.num_train_steps == 5 and c.optimizer.momentum == 0.0
  with pytest.raises(ValueError, match=r"'epochs' must be >= 0; got -1"):
    configs.get("demo", ["epochs=-1", "num_train_steps=5"])
  with pytest.raises(ValueError, match=r"'eval_batch_size' must be >= 1; got 0"):
    configs.validate({"eval_batch_size": 0})
  for name in configs.names():  # every preset and checkout config is still valid
    configs.get(name)


def test_run_demo_checks_epochs_before_training(tmp_path):
  with pytest.raises(ValueError, match="epochs must be >= 1; got -1"):
    run_demo(tmp_path, epochs=-1, verbose=False)
  with pytest.raises(TypeError, match="epochs must be an integer; got 2.5"):
    run_demo(tmp_path, epochs=2.5, verbose=False)
  assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ certify
def _fake_run(monkeypatch, overrides):
  """Make ``certify`` see a run of the demo config with ``overrides`` (variables as
  shapes only: the certifiability check traces, it computes nothing)."""
  config = configs.get("demo", overrides)
  model = training.build_model(config, 10)
  key = jax.random.PRNGKey(0)
  variables = jax.eval_shape(model.init, {"params": key, "noise": key}, jnp.zeros((1, 8, 8, 1)))
  state = types.SimpleNamespace(variables=variables)

  def restore(workdir, which="latest"):
    del workdir, which
    return state, config
  monkeypatch.setattr(certify_cmd.training, "restore", restore)
  return model, variables


def test_certify_of_a_noisy_model_gives_the_not_certifiable_message(monkeypatch, capsys,
                                                                    tmp_path):
  _fake_run(monkeypatch, ["model.step.name=euler_maruyama", "model.step.coef=0.1"])
  code, line = exit_and_error(capsys, "certify", "--workdir", str(tmp_path),
                              "--num_examples", "4", "--domain", "box")
  assert code == 2 and line.startswith("jaxdefense certify: error: EulerMaruyama(")
  assert "is not certifiable" in line and "Gaussian noise" in line
  assert "rngs" not in line and "JAX" not in line
  assert not (tmp_path / "certify.json").exists()


def test_certify_refuses_a_model_that_draws_noise_at_evaluation(monkeypatch, capsys,
                                                                tmp_path):
  model, variables = _fake_run(monkeypatch, ["model.step.name=euler"])
  x = jnp.zeros((2, 8, 8, 1))
  # a deterministic model passes the check, in every domain
  assert certify_cmd._check_certifiable(model, variables, x, 0.1,
                                        ("box", "zonotope", "deepz"), {"relu": "box"},
                                        "m") is None
  # one that draws noise at evaluation time is refused even when it traces abstractly
  monkeypatch.setattr(certify_cmd.models, "is_stochastic", lambda module, train=False: True)
  code, line = exit_and_error(capsys, "certify", "--workdir", str(tmp_path),
                              "--num_examples", "4", "--domain", "box")
  assert code == 2 and "is not certifiable: it draws noise at evaluation time" in line
  assert str(tmp_path) in line and "rngs" not in line


def test_certify_checks_its_options_before_loading_the_run(capsys, tmp_path):
  # the run does not exist: these errors must come first
  code, line = exit_and_error(capsys, "certify", "--workdir", str(tmp_path),
                              "--domain", "box,polytope")
  assert code == 2 and "--domain must list names from" in line and "'polytope'" in line
  code, line = exit_and_error(capsys, "certify", "--workdir", str(tmp_path),
                              "--domain", "deepz", "--relu", "box")
  assert code == 2 and "--domain deepz implies --relu deepz; got --relu box" in line


# ------------------------------------------------------- the central error rule
@pytest.fixture
def fake_command(monkeypatch):
  """Install a subcommand ``fake`` that raises ``error`` (set through the returned
  dict)."""
  box = {}

  def run(args, overrides):
    del args, overrides
    raise box["error"]

  monkeypatch.setattr(_main, "COMMANDS", (*_main.COMMANDS,
                                          _base.Command("fake", "raises", lambda p: None, run)))
  monkeypatch.delenv(_main.TRACEBACK_ENV, raising=False)
  return box


@pytest.mark.parametrize("error,code,text", [
    (ValueError("lr must be >= 0; got -1."), 2, "lr must be >= 0; got -1."),
    (TypeError("x must be an array"), 2, "x must be an array"),
    (_base.UserError("--flag must be ...\n  on two lines"), 2, "--flag must be ... on two lines"),
    (FileNotFoundError("no such run 'w'"), 2, "no such run 'w'"),
    (NotADirectoryError("workdir 'f' is a file"), 2, "workdir 'f' is a file"),
    (FloatingPointError("loss became nan at step 3"), 1, "loss became nan at step 3"),
])
def test_known_errors_print_one_line(fake_command, capsys, error, code, text):
  fake_command["error"] = error
  got, line = exit_and_error(capsys, "fake")
  assert got == code and line == f"jaxdefense fake: error: {text}"


def test_traceback_is_opt_in_and_internal_errors_keep_it(fake_command, monkeypatch, capsys):
  fake_command["error"] = ValueError("bad value")
  with pytest.raises(ValueError, match="bad value"):
    run_main("fake", "--traceback")
  monkeypatch.setenv(_main.TRACEBACK_ENV, "1")
  with pytest.raises(ValueError, match="bad value"):
    run_main("fake")
  monkeypatch.setenv(_main.TRACEBACK_ENV, "0")
  assert exit_and_error(capsys, "fake")[0] == 2
  fake_command["error"] = RuntimeError("internal bug")  # not a user error: unchanged
  with pytest.raises(RuntimeError, match="internal bug"):
    run_main("fake")
  assert capsys.readouterr().err == ""


def test_ctrl_c_is_not_swallowed(fake_command, monkeypatch, capsys):
  fake_command["error"] = KeyboardInterrupt()
  with pytest.raises(SystemExit) as e:
    run_main("fake")
  assert e.value.code == 130 and capsys.readouterr().err == "jaxdefense fake: interrupted\n"
  monkeypatch.setenv(_main.TRACEBACK_ENV, "yes")
  with pytest.raises(KeyboardInterrupt):
    run_main("fake")


# ------------------------------------------------------- real processes
def _assert_one_line_error(result, prefix):
  assert result.returncode == 2, (result.returncode, result.stderr)
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr


def test_python_dash_m_error_is_one_line():
  # (`python -m jaxdefense --help` and the console script's success: tests/test_cli.py)
  result = run_python(["-m", "jaxdefense", "demo", "--epochs", "-1"], timeout=120)
  _assert_one_line_error(result, "jaxdefense demo: error: argument --epochs: ")


def test_help_explains_the_error_rule():
  text = _main.build_parser().format_help()
  assert "exits with status 2" in " ".join(text.split()) and _main.TRACEBACK_ENV in text
  sub = _main.build_parser().parse_known_args(["config", "--list"])[0]
  assert sub.traceback is False


def test_console_script_config_error(tmp_path):
  script = shutil.which("jaxdefense")
  if script is None:
    pytest.skip("console script not installed")
  result = subprocess.run([script, "train", "--config", "demo", "--workdir",
                           str(tmp_path / "run"), "--config.epochs.x=3",
                           "--compile_cache", "none"],
                          capture_output=True, text=True, timeout=120, env=subprocess_env())
  _assert_one_line_error(result, "jaxdefense train: error: cannot set config key 'epochs.x'")
  assert not (tmp_path / "run").exists()
