"""The command line (`jaxdefense.commands`): subcommands, config overrides, errors, demo."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess

import pytest

from jaxdefense import commands, training
from jaxdefense.commands import _base, _main

from conftest import run_python

TINY = ["model.name=mlp", "model.hidden=(32,)", "epochs=2", "batch_size=64",
        "eval_batch_size=200", "validation_size=200", "checkpoint.keep_best=true",
        "progress_bar=false", "log_every_steps=5", "schedule.name=constant",
        "optimizer.learning_rate=0.05"]


def run_main(*argv: str) -> int:
  return commands.main([*argv, "--compile_cache", os.environ["JAX_COMPILATION_CACHE_DIR"]])


def exit_status(*argv: str) -> int:
  """run_main's status: its return value, or the code of the SystemExit it raised."""
  try:
    return run_main(*argv)
  except SystemExit as e:
    return e.code


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cli_run")
  assert run_main("train", "--config", "demo", "--workdir", str(workdir),
                  *[f"--config.{o}" for o in TINY]) == 0
  return workdir


def test_config_list_and_show(capsys):
  assert run_main("config", "--list") == 0
  names = capsys.readouterr().out.split()
  assert {"demo", "digits_resnet", "fashion_mnist_resnet", "cifar10_resnet20"} <= set(names)
  assert run_main("config", "--config", "demo", "--config.epochs=3",
                  "--config.model.step.name", "damped") == 0
  out = capsys.readouterr().out
  assert "epochs: 3" in out and "name: damped" in out


def test_train_writes_a_run_and_prints_a_table(trained, capsys):
  records = training.read_metrics(trained / "metrics.jsonl")
  assert records[-1]["kind"] == "final" and records[-1]["step"] == 38
  state, config = training.restore(trained)
  assert config.model.name == "mlp" and config.epochs == 2 and int(state.step) == 38


def test_eval_prints_an_aligned_table(trained, capsys):
  assert run_main("eval", "--workdir", str(trained), "--split", "validation",
                  "--split", "test") == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert "mlp on digits: latest checkpoint, step 38" in lines[0]
  assert lines[1].split() == ["split", "loss", "accuracy", "examples"]
  assert lines[3].startswith("validation") and lines[4].startswith("test")
  assert len({len(line) for line in lines[1:]}) <= 2  # columns aligned
  assert "%" in lines[4]
  assert run_main("eval", "--workdir", str(trained), "--which", "best") == 0
  assert "best checkpoint" in capsys.readouterr().out


def test_clear_errors(tmp_path, capsys):
  rc = exit_status("train", "--config", "demo", "--workdir", str(tmp_path),
                   "--config.optimizer.learning_rat=0.1")
  err = capsys.readouterr().err
  assert rc == 2 and "unknown config key 'optimizer.learning_rat'" in err
  assert "optimizer.learning_rate" in err
  rc = exit_status("train", "--config", "no_such_config", "--workdir", str(tmp_path))
  assert rc == 2 and "unknown config 'no_such_config'" in capsys.readouterr().err
  rc = exit_status("eval", "--workdir", str(tmp_path / "empty"))
  assert rc == 2 and "no latest checkpoints" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    run_main("train", "--config", "demo", "--workdir", str(tmp_path), "--bogus")
  assert e.value.code == 2
  with pytest.raises(SystemExit):
    run_main("eval", "--workdir", str(tmp_path), "--config.epochs=3")


def test_eval_of_a_corrupt_run(trained, tmp_path, capsys):
  workdir = tmp_path / "copy"
  shutil.copytree(trained, workdir)
  for p in (workdir / "checkpoints" / "38" / "state").rglob("*"):
    if p.is_file():
      p.write_bytes(b"not a checkpoint")
  assert exit_status("eval", "--workdir", str(workdir)) == 2
  assert "corrupt" in capsys.readouterr().err


def test_the_subcommands_are_listed_explicitly():
  names = [c.name for c in _main.COMMANDS]
  assert names == ["train", "eval", "config", "demo", "attack", "certify", "report"]
  assert [m.COMMAND for m in _main.SUBCOMMAND_MODULES] == list(_main.COMMANDS)
  assert all(m.__name__.startswith("jaxdefense.commands.") for m in _main.SUBCOMMAND_MODULES)
  help_text = _main.build_parser().format_help()
  for name in names:
    assert name in help_text


def test_a_command_gets_its_flags_and_overrides(monkeypatch, capsys):
  seen = []

  def add_arguments(p):
    p.add_argument("--eps", type=_base.parse_eps, default=0.1)

  def run(args, overrides):
    seen.append((args.eps, overrides))
    print("fake ran")
    return 3

  fake = _base.Command("fake_attack", "a test subcommand", add_arguments, run,
                       config_overrides=True)
  monkeypatch.setattr(_main, "COMMANDS", (*_main.COMMANDS, fake))
  assert run_main("fake_attack", "--eps", "8/255", "--config.x=1", "--config.y", "2") == 3
  assert seen == [(8 / 255, ["x=1", "y=2"])] and "fake ran" in capsys.readouterr().out
  closed = _base.Command("fake_closed", "takes no overrides", add_arguments, run)
  monkeypatch.setattr(_main, "COMMANDS", (*_main.COMMANDS, closed))
  with pytest.raises(SystemExit) as e:
    run_main("fake_closed", "--config.x=1")
  assert e.value.code == 2 and "unrecognized arguments for 'fake_closed'" in \
      capsys.readouterr().err
  with pytest.raises(ValueError, match="'fake_attack' appears twice"):
    _main.build_parser([fake, fake])
  with pytest.raises(TypeError, match="Command objects"):
    _main.build_parser(["train"])


def test_command_and_parse_eps_reject_bad_input():
  noop = lambda *a: 0  # noqa: E731
  with pytest.raises(ValueError, match="one non-empty word"):
    _base.Command("two words", "h", noop, noop)
  with pytest.raises(ValueError, match="one non-empty word"):
    _base.Command("", "h", noop, noop)
  with pytest.raises(TypeError, match="run must be callable"):
    _base.Command("x", "h", noop, None)
  with pytest.raises(TypeError, match="config_overrides must be a bool"):
    _base.Command("x", "h", noop, noop, config_overrides="yes")
  assert _base.parse_eps("0.25") == 0.25 and _base.parse_eps("8/255") == 8 / 255
  for bad in ("eight", "1/0", "1/x"):
    with pytest.raises(argparse.ArgumentTypeError, match="8/255"):
      _base.parse_eps(bad)


def test_demo_quick(tmp_path, capsys):
  assert run_main("demo", "--quick", "--workdir", str(tmp_path)) == 0
  out = capsys.readouterr().out
  assert "ResNet (Euler)" in out and "EnResNet (Euler-Maruyama" in out
  assert "test accuracy" in out and "pgd-10" in out
  assert (tmp_path / "euler" / "metrics.jsonl").is_file()
  assert (tmp_path / "euler" / "robustness.json").is_file()
  assert (tmp_path / "euler_maruyama" / "metrics.jsonl").is_file()


def test_python_dash_m_and_console_script():
  result = run_python(["-m", "jaxdefense", "--help"], timeout=120)
  assert result.returncode == 0, result.stderr
  for name in ("train", "eval", "config", "demo", "attack", "certify", "report"):
    assert name in result.stdout
  script = shutil.which("jaxdefense")
  if script is None:
    pytest.skip("console script not installed")
  result = subprocess.run([script, "config", "--list", "--compile_cache", "none"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and "demo" in result.stdout.split(), result.stderr


@pytest.mark.slow
def test_full_demo_reaches_90_percent(capsys):
  from jaxdefense.commands.demo import run_demo
  rows = run_demo()
  assert all(r["test accuracy"] > 0.9 for r in rows), rows
