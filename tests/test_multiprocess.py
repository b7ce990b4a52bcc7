"""Real multi-process runs on localhost (issue 17): JAX's own distributed runtime and CPU
collectives, processes started by the test itself (a free port, bounded time).

* two (and four) processes train through the command line like one process: same parameters, checkpoints and metrics written once, results printed
  by process 0 only, and the run restores in this single process;
* a run stopped in two processes resumes in one and ends where an uninterrupted run
  ends;
* certification and a PGD attack through the batch runner give the same per-image
  results in two and in four processes as in one;
* bad flags and an unreachable coordinator fail with one clear line naming the flag,
  within the timeout; a process that dies makes the other stop (no hang).
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from conftest import subprocess_env
from jaxdefense import training

TINY = ["--config.model.name=mlp", "--config.model.hidden=(32,)", "--config.epochs=2",
        "--config.batch_size=64", "--config.eval_batch_size=200",
        "--config.validation_size=200", "--config.progress_bar=false",
        "--config.schedule.name=constant", "--config.optimizer.learning_rate=0.05",
        "--config.checkpoint.every_steps=10", "--config.checkpoint.max_to_keep=10"]
CLI = [sys.executable, "-m", "jaxdefense"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(commands, *, devices_per_process=1, timeout=300):
  """Start one process per command (each with ``devices_per_process`` CPU devices), wait
  for all of them at most ``timeout`` s (then kill them all), return their results."""
  env = subprocess_env(devices_per_process)
  env["PYTHONUNBUFFERED"] = "1"
  procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for c in commands]
  deadline = time.monotonic() + timeout
  outs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      outs.append((p.returncode, out))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return outs


def _flags(port: int, n: int, i: int) -> list[str]:
  return ["--coordinator_address", f"localhost:{port}", "--num_processes", str(n),
          "--process_id", str(i), "--init_timeout", "60", "--heartbeat_timeout", "10"]


def _leaves(tree):
  return [np.asarray(a) for a in jax.tree_util.tree_leaves(jax.device_get(tree))]


def _train_in(workdir, processes: int, *extra: str) -> list:
  """``jaxdefense train`` of the TINY run in ``processes`` processes (one device each);
  asserts every process succeeded and returns their outputs."""
  port = _free_port()
  outs = _launch([CLI + ["train", "--config", "demo", "--workdir", str(workdir), *TINY,
                         *extra, *_flags(port, processes, i)] for i in range(processes)])
  for i, (rc, out) in enumerate(outs):
    assert rc == 0, f"process {i}:\n{out[-3000:]}"
  return outs


def _same_params(a, b, atol: float = 1e-5) -> None:
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=atol)


def test_processes_train_like_one(tmp_path):
  multi, single = tmp_path / "two", tmp_path / "one"
  outs = _train_in(multi, 2)
  # the results table comes from process 0 only
  assert "validation" in outs[0][1] and "validation" not in outs[1][1], outs[1][1][-2000:]
  # the same run in one process with the same number of devices (2)
  (rc, out), = _launch([CLI + ["train", "--config", "demo", "--workdir", str(single),
                               *TINY]], devices_per_process=2)
  assert rc == 0, out[-3000:]
  for step in (10, None):
    a, _ = training.restore(multi, step=step)      # restored here: 1 process, 1 device
    b, _ = training.restore(single, step=step)
    assert int(a.step) == int(b.step)
    _same_params(a.params, b.params)
  # metrics written once: every logged step appears once
  records = training.read_metrics(multi / training.METRICS_FILE)
  logged = [r["step"] for r in records if r.get("kind") == "train"]
  assert logged and len(logged) == len(set(logged)), logged
  assert records[-1].get("devices") == 2
  # resumed with another process count: two processes stop at step 20, one process
  # (two devices) resumes that checkpoint and ends where the uninterrupted run ended
  mixed = tmp_path / "mixed"
  _train_in(mixed, 2, "--config.num_train_steps=20")
  assert training.Checkpoints(mixed).latest_step() == 20
  (rc, out), = _launch([CLI + ["train", "--config", "demo", "--workdir", str(mixed),
                               *TINY]], devices_per_process=2)
  assert rc == 0, out[-3000:]
  assert "resuming" in out and "from step 20" in out, out[-3000:]
  a, _ = training.restore(mixed)
  b, _ = training.restore(single)
  assert int(a.step) == int(b.step) > 20
  _same_params((a.params, a.opt_state), (b.params, b.opt_state))
  # four processes (one device each) for 10 steps: the same parameters at step 10
  four = tmp_path / "four"
  _train_in(four, 4, "--config.num_train_steps=10")
  _same_params(training.restore(four, step=10)[0].params,
               training.restore(single, step=10)[0].params)
  assert training.read_metrics(four / training.METRICS_FILE)[-1].get("devices") == 4


_EVAL = """
import sys
import jax, jax.numpy as jnp, numpy as np
import jaxdefense as jd
n = int(sys.argv[1])
if n > 1:
  jd.training.initialize_distributed(sys.argv[2], n, int(sys.argv[3]), timeout_s=60,
                                     heartbeat_timeout_s=10)
ds = jd.data.load("digits", "test")
x, y = np.asarray(ds.images[:96]), np.asarray(ds.labels[:96])
model = jd.models.create("mlp", num_classes=10, hidden=(32,))
v = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:2]))
acc, mask = jd.evaluation.certified_accuracy(model, v, (x, y), 0.001, "box", 16,
                                             progress=False, return_mask=True)
logits_fn = lambda a: model.apply(v, a)

def attacked(batch, key):
  xb, yb = batch
  adv = jd.attacks.pgd(logits_fn, xb, yb, key=key, eps=0.002, step_size=0.001, steps=5)
  return jnp.argmax(logits_fn(adv), -1) == yb

robust = jd.data.run_batches(attacked, (x, y), batch_size=16, key=jax.random.PRNGKey(1))
if jax.process_index() == 0:
  print("RESULT", acc, "".join("1" if m else "0" for m in np.asarray(mask)),
        "".join("1" if m else "0" for m in np.asarray(robust)), jax.process_count(),
        jax.device_count())
"""


@pytest.mark.parametrize("processes", [2, 4])
def test_evaluation_in_several_processes_matches_one(tmp_path, processes):
  script = tmp_path / "eval.py"
  script.write_text(textwrap.dedent(_EVAL))
  port = _free_port()
  outs = _launch([[sys.executable, str(script), str(processes), f"localhost:{port}", str(i)]
                  for i in range(processes)])
  for i, (rc, out) in enumerate(outs):
    assert rc == 0, f"process {i}:\n{out[-3000:]}"
  assert all("RESULT" not in out for _, out in outs[1:])
  multi = next(l for l in outs[0][1].splitlines() if l.startswith("RESULT")).split()
  (rc, out), = _launch([[sys.executable, str(script), "1"]], devices_per_process=processes)
  assert rc == 0, out[-3000:]
  one = next(l for l in out.splitlines() if l.startswith("RESULT")).split()
  n = str(processes)
  assert multi[4:] == [n, n] and one[4:] == ["1", n]
  assert multi[1:3] == one[1:3]      # certified accuracy and per-image mask
  assert multi[3] == one[3]          # PGD through the batch runner, per image
  assert "1" in one[2] and "1" in one[3]   # not vacuous: some images are proved / survive


@pytest.mark.parametrize("flags, name", [
    (["--coordinator_address", "localhost:PORT", "--num_processes", "2", "--process_id", "2"],
     "--process_id"),
    (["--num_processes", "2", "--process_id", "0"], "--coordinator_address"),
    (["--coordinator_address", "localhost", "--num_processes", "2", "--process_id", "0"],
     "--coordinator_address"),
])
def test_bad_flags_are_one_clear_line(tmp_path, flags, name):
  flags = [f.replace("PORT", str(_free_port())) for f in flags]
  (rc, out), = _launch([CLI + ["train", "--config", "demo", "--workdir", str(tmp_path),
                               *TINY, *flags]], timeout=120)
  assert rc == 2, out[-2000:]
  last = out.strip().splitlines()[-1]
  assert last.startswith("jaxdefense train: error:") and name in last, out[-2000:]
  assert "Traceback" not in out


def test_unreachable_coordinator_fails_within_the_timeout(tmp_path):
  port = _free_port()                   # nobody listens there
  t = time.monotonic()
  (rc, out), = _launch([CLI + ["train", "--config", "demo", "--workdir", str(tmp_path),
                               *TINY, "--coordinator_address", f"localhost:{port}",
                               "--num_processes", "2", "--process_id", "1",
                               "--init_timeout", "3"]], timeout=120)
  assert rc == 1, out[-2000:]
  last = out.strip().splitlines()[-1]
  assert "could not reach the coordinator" in last and "--coordinator_address" in last
  assert time.monotonic() - t < 60
  assert "Traceback" not in out


def test_mismatched_process_counts_are_named(tmp_path):
  port = _free_port()
  outs = _launch([CLI + ["train", "--config", "demo", "--workdir", str(tmp_path / "w"),
                         *TINY, *_flags(port, n, i)] for i, n in ((0, 2), (1, 3))],
                 timeout=240)
  rc1, out1 = outs[1]
  assert rc1 == 1 and "--num_processes" in out1.strip().splitlines()[-1], out1[-2000:]
  # process 0 does not hang: its peer is gone, it stops with an error
  assert outs[0][0] != 0, outs[0][1][-2000:]


@pytest.mark.slow
def test_a_dead_process_stops_the_other(tmp_path):
  port = _free_port()
  env = subprocess_env(1)
  env["PYTHONUNBUFFERED"] = "1"
  long = [*TINY, "--config.epochs=40"]
  procs = [subprocess.Popen(CLI + ["train", "--config", "demo", "--workdir",
                                   str(tmp_path / "w"), *long, *_flags(port, 2, i)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  try:
    ckpts = tmp_path / "w" / "checkpoints"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (ckpts.is_dir() and any(ckpts.iterdir())):
      time.sleep(0.2)
    assert procs[0].poll() is None and procs[1].poll() is None, "run ended too early"
    os.kill(procs[1].pid, signal.SIGKILL)
    t = time.monotonic()
    out, _ = procs[0].communicate(timeout=120)   # heartbeat timeout 10 s
    assert procs[0].returncode != 0, out[-2000:]
    assert time.monotonic() - t < 120
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def test_initialize_distributed_rejects_bad_arguments_before_touching_jax():
  init = training.initialize_distributed
  with pytest.raises(ValueError, match=r"process_id must be in \[0, num_processes\)"):
    init("localhost:1234", 2, 5)
  with pytest.raises(ValueError, match="missing num_processes, process_id"):
    init("localhost:1234")
  with pytest.raises(ValueError, match="'host:port'"):
    init("localhost", 2, 0)
  with pytest.raises(ValueError, match="timeout_s must be an int >= 1"):
    init("localhost:1234", 2, 0, timeout_s=0)
