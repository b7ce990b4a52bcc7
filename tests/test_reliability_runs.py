"""Reliability of runs (issue 18): checkpoint checksums, the workdir lock, bad workdirs,
and a clear message for a missing best checkpoint.

The damage tests flip bytes in the middle of orbax's data files, as a failing disk or
copy would, and first confirm with plain orbax (no verification) that the damage really
changes the arrays silently: so they fail if the checksums are not verified.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxdefense import commands, configs, training

from conftest import subprocess_env

TINY = ["model.name=mlp", "model.hidden=(32,)", "epochs=2", "batch_size=64",
        "eval_batch_size=200", "validation_size=200", "checkpoint.keep_best=true",
        "checkpoint.max_to_keep=2", "progress_bar=false", "log_every_steps=5",
        "schedule.name=constant", "optimizer.learning_rate=0.05"]


def tiny_config(*extra: str):
  return configs.get("demo", [*TINY, *extra])


def cli_args(command: str, workdir, *extra: str, config: bool = False) -> list[str]:
  args = [command, "--workdir", str(workdir), *extra]
  if config:
    args += ["--config", "demo", *[f"--config.{o}" for o in TINY]]
  return args + ["--compile_cache", os.environ["JAX_COMPILATION_CACHE_DIR"]]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
  """``python -m jaxdefense ARGS`` in a child process."""
  return subprocess.run([sys.executable, "-m", "jaxdefense", *args], env=subprocess_env(),
                        capture_output=True, text=True, timeout=timeout)


def main_in_process(*args: str) -> int:
  """``jaxdefense.commands.main`` here; its exit status (returned or raised)."""
  try:
    return int(commands.main(list(args)) or 0)
  except SystemExit as e:
    return int(e.code or 0)


def assert_one_line_error(stderr: str, *needles: str) -> str:
  lines = [line for line in stderr.strip().splitlines() if "error:" in line]
  assert "Traceback" not in stderr, stderr
  assert len(lines) == 1, stderr
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A tiny finished run: mlp on digits, 2 epochs = 38 steps, checkpoints at 19 and 38."""
  workdir = tmp_path_factory.mktemp("reliability_run")
  state = training.train_and_evaluate(tiny_config(), workdir, verbose=False)
  return workdir, jax.device_get(state.to_tree())


def _path_name(path) -> str:
  """A tree path as ``params/Dense_0/kernel`` or ``opt_state/1/trace/Dense_0/kernel``."""
  return "/".join(str(next(getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)))
                  for k in path)


def _raw_state(state_dir) -> dict[str, np.ndarray]:
  """The arrays of a checkpoint's ``state`` item read by plain orbax (no checksums)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with ocp.PyTreeCheckpointer() as c:
      tree = c.restore(str(state_dir))
  return {_path_name(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flipped(data: bytes, offset: int, count: int) -> bytes:
  out = bytearray(data)
  for i in range(offset, min(offset + count, len(out))):
    out[i] ^= 0xFF
  return bytes(out)


def damage_silently(workdir, step: int, group: str, scratch, count: int = 16) -> list[str]:
  """Flip ``count`` bytes near the middle of a data file of
  ``checkpoints/<step>/state``, at an offset where plain orbax reads the damaged
  checkpoint without any error but with changed ``group`` arrays only (``"params"`` or
  ``"opt_state"``): the silent corruption the checksums must catch.  Offsets are tried
  from the middle outwards (orbax's files mix several compressed arrays).

  Returns:
    The names of the changed arrays (``params/Dense_0/kernel``...).
  """
  state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
  intact = _raw_state(state_dir)
  trial = os.path.join(scratch, "trial")
  shutil.copytree(state_dir, trial)
  files = sorted(glob.glob(os.path.join(state_dir, "ocdbt.process_0", "d", "*")),
                 key=os.path.getsize, reverse=True)
  seen = []
  for f in files[:2]:
    data = open(f, "rb").read()
    target = os.path.join(trial, os.path.relpath(f, state_dir))
    mid = len(data) // 2
    offsets = sorted(range(0, len(data) - count, 256), key=lambda o: abs(o - mid))
    for offset in offsets[:40]:
      open(target, "wb").write(_flipped(data, offset, count))
      try:
        got = _raw_state(trial)
      except Exception:  # orbax noticed this damage by itself: not the silent case
        seen.append((offset, "error"))
        continue
      changed = [n for n in intact if not np.array_equal(intact[n], got[n], equal_nan=True)]
      seen.append((offset, changed))
      if changed and all(n.startswith(group + "/") for n in changed):
        open(f, "wb").write(_flipped(data, offset, count))
        return changed
    open(target, "wb").write(data)
  raise AssertionError(f"no silent damage of {group} arrays found in {state_dir}: {seen}")


# ------------------------------------------------------------------ checksums
def test_bit_flips_in_the_parameters_fail_restore_and_eval(finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run[0], workdir)
  changed = damage_silently(workdir, 38, "params", tmp_path)
  with pytest.raises(training.CheckpointError) as e:
    training.restore(workdir)
  msg = str(e.value)
  assert "checkpoints/38 (step 38) is corrupt" in msg and "SHA-256" in msg
  assert all(f"state/{n}" in msg for n in changed), (changed, msg)
  assert "restore(workdir, step=N)" in msg and "steps [19]" in msg  # how to fall back
  # The fallbacks it names work: the older periodic step and the (separate) best copy.
  older, _ = training.restore(workdir, step=19)
  assert int(older.step) == 19
  best, _ = training.restore(workdir, which="best")
  assert np.isfinite(np.asarray(best.params["Dense_0"]["kernel"])).all()
  # `jaxdefense eval` goes through the same restore: one clear line, no table.
  result = run_cli(*cli_args("eval", workdir))
  assert result.returncode != 0, result.stdout
  line = assert_one_line_error(result.stderr, "step 38", "SHA-256", changed[0])
  assert "accuracy" not in result.stdout and "fall back" in line


def test_bit_flips_in_the_optimizer_state_fail_resume(finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run[0], workdir)
  shutil.rmtree(workdir / "checkpoints" / "38")  # a run that stopped after epoch 1
  changed = damage_silently(workdir, 19, "opt_state", tmp_path)
  result = run_cli(*cli_args("train", workdir, config=True))
  assert result.returncode != 0, result.stdout + result.stderr
  line = assert_one_line_error(result.stderr, "checkpoints/19 (step 19) is corrupt",
                               f"state/{changed[0]}", "SHA-256")
  assert "starts again from step 0" in line  # no older periodic checkpoint to resume
  assert training.Checkpoints(workdir, read_only=True).steps() == [19]  # nothing trained


def test_checksums_cover_the_config_and_old_checkpoints_still_load(finished_run, tmp_path):
  src, tree = finished_run
  # A changed digit in the stored config is still valid JSON: only the checksum sees it.
  workdir = tmp_path / "run"
  shutil.copytree(src, workdir)
  cfg_file = workdir / "checkpoints" / "38" / "config" / "metadata"
  text = cfg_file.read_text()
  assert '"learning_rate": 0.05' in text
  cfg_file.write_text(text.replace('"learning_rate": 0.05', '"learning_rate": 0.07'))
  with pytest.raises(training.CheckpointError, match=r"step 38\) is corrupt: config differs"):
    training.restore(workdir)
  # A checkpoint written before checksums existed (state, config, meta only) loads,
  # unverified, with one warning per checkpoint.
  old = tmp_path / "old"
  items = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
           "meta": ocp.JsonCheckpointHandler()}
  _, config, meta = training.Checkpoints(src, read_only=True).restore_config(38)
  with ocp.CheckpointManager(old / "checkpoints", item_handlers=items,
                             options=ocp.CheckpointManagerOptions(
                                 enable_async_checkpointing=False)) as mngr:
    mngr.save(38, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                          config=ocp.args.JsonSave(config),
                                          meta=ocp.args.JsonSave(meta)))
  assert not (old / "checkpoints" / "38" / "checksums").exists()
  with pytest.warns(UserWarning, match="has no checksums"):
    state, _ = training.restore(old)
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state.to_tree())),
                  jax.tree_util.tree_leaves(tree)):
    np.testing.assert_array_equal(a, b)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the warning is given once per checkpoint
    training.restore(old)


# ---------------------------------------------------------------- the lock
def test_a_second_run_on_a_workdir_fails_at_once_naming_the_holder(tmp_path, capsys):
  """A `jaxdefense train` child process holds the workdir; a second run (here, another
  process) fails at once naming the child's process id; SIGKILL frees the workdir."""
  workdir = tmp_path / "run"
  holder = subprocess.Popen(
      [sys.executable, "-m", "jaxdefense",
       *cli_args("train", workdir, config=True), "--config.epochs=1000"],
      env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    lock_file = workdir / training.LOCK_FILE
    deadline = time.time() + 180
    while time.time() < deadline and holder.poll() is None:
      if lock_file.is_file() and f'"pid": {holder.pid}' in lock_file.read_text():
        break
      time.sleep(0.05)
    assert holder.poll() is None, holder.stdout.read().decode()
    t0 = time.time()
    assert main_in_process(*cli_args("train", workdir, config=True)) != 0
    assert_one_line_error(capsys.readouterr().err, f"process {holder.pid}", str(workdir),
                          "another training run")
    with pytest.raises(training.WorkdirLockedError, match=f"process {holder.pid}"):
      training.train_and_evaluate(tiny_config(), workdir, verbose=False)
    assert time.time() - t0 < 30 and holder.poll() is None  # no waiting for the holder
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  # SIGKILL released it: the next holder gets it and writes its own process id.
  with training.WorkdirLock(workdir) as lock:
    assert lock.locked and f'"pid": {os.getpid()}' in lock_file.read_text()
    with pytest.raises(training.WorkdirLockedError, match=f"process {os.getpid()}"):
      training.WorkdirLock(workdir).acquire()
  assert not lock.locked


def test_reading_a_run_needs_no_lock(finished_run):
  workdir, tree = finished_run
  with training.WorkdirLock(workdir):  # as if the run were training now
    state, _ = training.restore(workdir)
    rows = training.evaluate_checkpoint(workdir, step=19)
  assert int(state.step) == 38 and rows[0]["step"] == 19


# ------------------------------------------------------------ bad workdirs
def test_a_workdir_that_is_a_file_or_under_a_file(tmp_path, capsys):
  afile = tmp_path / "notes.txt"
  afile.write_text("not a folder")
  under = afile / "run"
  with pytest.raises(ValueError, match=re.escape(f"workdir='{afile}' is a file, not a")):
    training.train_and_evaluate(tiny_config(), afile, verbose=False)
  with pytest.raises(ValueError, match=re.escape(f"lies under '{afile}', which is a file")):
    training.train_and_evaluate(tiny_config(), under, verbose=False)
  with pytest.raises(ValueError, match="is a file, not a folder"):
    training.restore(afile)
  with pytest.raises(TypeError, match="workdir must be a str or os.PathLike"):
    training.restore(3)
  assert afile.read_text() == "not a folder"
  for args in (cli_args("train", under, config=True), cli_args("eval", afile)):
    assert main_in_process(*args) != 0
    assert_one_line_error(capsys.readouterr().err, str(afile), "a file")


def test_eval_best_on_a_run_without_best_checkpoints(tmp_path, capsys):
  workdir = tmp_path / "run"
  training.train_and_evaluate(
      tiny_config("validation_size=0", "train_size=256", "epochs=1"), workdir, verbose=False)
  with pytest.raises(FileNotFoundError) as e:
    training.restore(workdir, which="best")
  msg = str(e.value)
  assert "no 'best' checkpoint" in msg and "validation_size=0" in msg
  assert "steps [4]" in msg and "which='latest'" in msg and "train first" not in msg
  assert main_in_process(*cli_args("eval", workdir, "--which", "best")) != 0
  assert_one_line_error(capsys.readouterr().err, "no 'best' checkpoint", "--which latest")
  assert main_in_process(*cli_args("eval", workdir, "--which", "latest")) == 0
  assert "step 4" in capsys.readouterr().out
