"""The experiment runner (``jaxdefense.evaluation.Study``) and its statistics."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from jaxdefense import evaluation
from jaxdefense.evaluation import Cell, Study, _stats, _study

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A study spec in a file (so that one-cell-per-process and `jaxdefense report` can load it).
SPEC = '''
import json, os
from jaxdefense.evaluation import Cell, Study

def run(ctx):
  calls = os.path.join(ctx.runs_dir, "calls.jsonl")
  with open(calls, "a") as f:
    f.write(json.dumps([ctx.cell.name, ctx.seed]) + "\\n")
  if os.environ.get("FAIL_CELL") == ctx.cell.name:
    raise RuntimeError("killed mid-way")
  acc = {"a": 0.60, "b": 0.70}[ctx.cell.name] + 0.01 * ctx.seed
  return {"accuracy": acc, "n": 1000, "lr": ctx.config.optimizer.learning_rate,
          "timings": {"train_s": 1.0}}

def combine(ctx):
  return {"sum": ctx.results.metrics("a", ctx.seed)["accuracy"]
          + ctx.results.metrics("b", ctx.seed)["accuracy"]}

STUDY = Study("fake", "demo", [
    Cell("a", {"optimizer.learning_rate": 0.01}),
    Cell("b", {"optimizer.learning_rate": 0.02}),
    Cell("both", needs=("a", "b"), run=combine)],
  seeds=(0, 1, 2), run=run, spec=__file__, root=os.path.dirname(__file__),
  results_dir=os.environ.get("RESULTS"), runs_dir=os.environ.get("RUNS"))
'''


@pytest.fixture
def spec(tmp_path, monkeypatch):
  path = tmp_path / "spec.py"
  path.write_text(SPEC)
  monkeypatch.setenv("RESULTS", str(tmp_path / "results"))
  monkeypatch.setenv("RUNS", str(tmp_path / "runs"))
  (tmp_path / "runs").mkdir()
  (tmp_path / ".git").mkdir()  # marks the repository root that relative spec paths use
  res = _study.Results(str(tmp_path / "results" / "results.json"),
                       {"study": {"spec": str(path), "object": "STUDY"}})
  return _study.load_study(res), tmp_path


def _calls(tmp_path):
  p = tmp_path / "runs" / "calls.jsonl"
  return [tuple(json.loads(x)) for x in p.read_text().splitlines()] if p.exists() else []


def test_resumes_a_half_done_study_and_skips_finished_cells(spec, monkeypatch):
  study, tmp = spec
  monkeypatch.setenv("FAIL_CELL", "b")
  with pytest.raises(RuntimeError, match="killed mid-way"):
    evaluation.run_study(study, log=lambda m: None)
  res = evaluation.load_results(tmp / "results")
  assert [(r["cell"], r["seed"], r["status"]) for r in res.records] == [
      ("a", 0, "done"), ("a", 1, "done"), ("a", 2, "done"), ("b", 0, "failed")]
  assert "killed mid-way" in res.record("b", 0)["error"]
  monkeypatch.delenv("FAIL_CELL")
  res = evaluation.run_study(study, log=lambda m: None)
  # the three finished cells were not run again; b seed 0 was retried
  assert _calls(tmp) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 0), ("b", 1), ("b", 2)]
  assert all(r["status"] == "done" for r in res.records) and len(res.records) == 9
  assert res.record("b", 0)["attempts"] == 2
  assert res.metrics("both", 1)["sum"] == pytest.approx(0.61 + 0.71)
  evaluation.run_study(study, log=lambda m: None)  # nothing left to do
  assert len(_calls(tmp)) == 7
  # recorded provenance: commit, the command, the resolved config, metrics, timings
  r = res.record("a", 1)
  assert r["command"].endswith("--cell a --seed 1 --force") and "spec.py" in r["command"]
  assert r["config"]["seed"] == 1 and r["config"]["optimizer"]["learning_rate"] == 0.01
  assert r["metrics"]["lr"] == 0.01 and "timings" not in r["metrics"]
  assert r["timings"]["train_s"] == 1.0 and r["timings"]["wall_s"] >= 0
  assert r["machine"]["backend"] == "cpu" and r["machine"]["devices"]
  assert set(r) >= {"commit", "dirty", "argv", "started", "finished", "workdir"}


def test_recorded_commit_is_the_checkout_head():
  info = _study.git_info(ROOT)
  if info["commit"] is None:
    pytest.skip("not a git checkout")
  head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                        text=True).stdout.strip()
  assert info["commit"] == head and isinstance(info["dirty"], bool)


def test_one_cell_per_process_writes_the_same_results(spec, tmp_path):
  study, tmp = spec
  env = {**os.environ, "RESULTS": str(tmp / "results"), "RUNS": str(tmp / "runs"),
         "JAX_PLATFORMS": "cpu"}
  code = ("import importlib.util, sys; from jaxdefense.evaluation import study_main; "
          "s = importlib.util.spec_from_file_location('spec', sys.argv[1]); "
          "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
          "sys.exit(study_main(m.STUDY, sys.argv[2:]))")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp / "spec.py"), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for args in (["--index", "4"], ["--cell", "a", "--seed", "2"])]
  for p in procs:  # two cells at once, as a job array would run them
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err.decode()[-2000:]
  # the rest in this process: the two recorded cells are skipped
  evaluation.run_study(study, log=lambda m: None)
  assert sorted(_calls(tmp)) == sorted((c, s) for c in "ab" for s in (0, 1, 2))
  many = evaluation.load_results(tmp / "results")
  one = evaluation.run_study(study, results_dir=tmp_path / "serial", log=lambda m: None)
  key = lambda res: sorted((r["cell"], r["seed"], json.dumps(r["metrics"], sort_keys=True),
                            json.dumps(r["config"], sort_keys=True), r["command"])
                           for r in res.records)
  assert key(many) == key(one)
  assert [r["cell"] for r in many.records][:3] == ["a", "a", "a"]  # grid order kept
  assert "--index 4" in many.record("b", 1)["argv"]
  assert many.record("a", 2)["argv"].endswith("--cell a --seed 2")


def test_needs_not_done_is_a_clear_error(spec):
  study, tmp = spec
  with pytest.raises(ValueError, match=r"needs \['a', 'b'\] done first"):
    evaluation.run_study(study, cells=["both"], log=lambda m: None)
  with pytest.raises(ValueError, match=r"index must be an integer in \[0, 8\]"):
    evaluation.run_study(study, index=9, log=lambda m: None)
  with pytest.raises(ValueError, match="unknown cell 'c'"):
    evaluation.run_study(study, cells=["c"], log=lambda m: None)
  with pytest.raises(ValueError, match="needs 'x', which is not a cell listed before"):
    Study("s", "demo", [Cell("a", needs=("x",))], run=lambda c: {})


def test_per_cell_seeds_and_needs_over_all_seeds(tmp_path):
  """A cell may run fewer seeds than the study; an ensemble-like cell waits for every
  seed of the cells it needs."""
  calls = []

  def run(ctx):
    calls.append((ctx.cell.name, ctx.seed))
    return {"accuracy": 0.5 + 0.01 * ctx.seed, "n": 100}

  def combine(ctx):
    calls.append((ctx.cell.name, ctx.seed))
    vals = [ctx.results.metrics("a", s)["accuracy"] for s in ctx.study.seeds_of("a")]
    return {"mean": sum(vals) / len(vals)}

  (tmp_path / ".git").mkdir()
  study = Study("seeds", "demo", [
      Cell("a"), Cell("b", seeds=(0, 1)),
      Cell("ens", needs=("a",), needs_all_seeds=True, run=combine, seeds=(0,))],
      seeds=(0, 1, 2), run=run, root=tmp_path, results_dir=tmp_path / "results",
      runs_dir=tmp_path / "runs")
  assert [(c.name, s) for c, s in study.grid()] == [
      ("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("ens", 0)]
  assert study.describe()["cells"]["b"]["seeds"] == [0, 1]
  with pytest.raises(ValueError, match=r"needs \['a seed 0', 'a seed 1', 'a seed 2'\]"):
    evaluation.run_study(study, cells=["ens"], log=lambda m: None)
  evaluation.run_study(study, cells=["a"], seeds=[0, 1], log=lambda m: None)
  with pytest.raises(ValueError, match=r"needs \['a seed 2'\] done first.*--seed 2"):
    evaluation.run_study(study, cells=["ens"], log=lambda m: None)
  res = evaluation.run_study(study, log=lambda m: None)
  assert calls == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("ens", 0)]
  assert res.metrics("ens", 0)["mean"] == pytest.approx(0.51)
  assert res.seeds("b") == [0, 1]
  assert res.compare(("b", "accuracy"), ("a", "accuracy"), n="n").a.k == 2
  assert res.compare(("b", "accuracy"), ("a", "accuracy"), n="n", common_seeds=False).b.k == 3
  for bad, err in (((), ValueError), ((1, 1), ValueError), (("0",), TypeError),
                   (3, TypeError)):
    with pytest.raises(err, match="Cell 'x': seeds"):
      Cell("x", seeds=bad)


def test_standard_errors():
  assert _stats.binomial_se(0.68, 250) == pytest.approx(math.sqrt(0.68 * 0.32 / 250))
  e = evaluation.estimate([0.60, 0.62, 0.67])
  mean = (0.60 + 0.62 + 0.67) / 3
  sd = math.sqrt(sum((v - mean) ** 2 for v in (0.60, 0.62, 0.67)) / 2)
  assert e.kind == "seeds" and e.mean == pytest.approx(mean)
  assert e.se == pytest.approx(sd / math.sqrt(3))
  one = evaluation.estimate(0.8, n=100)
  assert one.kind == "binomial" and one.se == pytest.approx(0.04)
  assert one.format() == "80.0 ± 4.0"
  with pytest.raises(ValueError, match="p must be a fraction"):
    _stats.binomial_se(1.2, 10)
  with pytest.raises(ValueError, match="n must be a positive integer"):
    _stats.binomial_se(0.5, 0)


def test_two_proportion_z_against_a_hand_computation():
  # 60 % vs 50 % on 200 images each: pooled q = 0.55,
  # se = sqrt(0.55 * 0.45 * (2 / 200)) = 0.0497494; z = 0.1 / se = 2.010076;
  # two-sided p = 2 (1 - Phi(2.010076)) = 0.044418 (normal table: Phi(2.01) = 0.97778).
  z, p = evaluation.two_proportion_z(0.6, 200, 0.5, 200)
  assert z == pytest.approx(2.010076, abs=1e-5)
  assert p == pytest.approx(0.044418, abs=2e-5)
  c = evaluation.compare(0.6, 0.5, ">", n=200)
  assert c.verdict == "held" and "z-test" in c.test
  assert evaluation.compare(0.6, 0.5, "<", n=200).verdict == "did not hold"
  assert evaluation.compare(0.55, 0.5, ">", n=200).verdict == "inconclusive"
  with pytest.raises(ValueError, match="needs n"):
    evaluation.compare(0.6, 0.5)


def test_welch_t_against_a_hand_computation():
  # a = 1, 2, 3 (mean 2, s^2 = 1); b = 4, 6, 8 (mean 6, s^2 = 4):
  # se^2 = 1/3 + 4/3 = 5/3; t = -4 / sqrt(5/3) = -3.098387;
  # df = (5/3)^2 / ((1/3)^2 / 2 + (4/3)^2 / 2) = 2.941176; p = 0.05484 (t table).
  t, df, p = evaluation.welch_t([1, 2, 3], [4, 6, 8])
  assert t == pytest.approx(-3.098387, abs=1e-5) and df == pytest.approx(2.941176, abs=1e-5)
  assert p == pytest.approx(0.0548, abs=5e-4)
  c = evaluation.compare([0.70, 0.71, 0.72], [0.60, 0.62, 0.61], ">")
  assert c.verdict == "held" and "Welch" in c.test
  assert evaluation.compare([1, 2, 3], [4, 6, 8], "<").verdict == "inconclusive"
  # one value on n images against a mean over seeds: z = (0.7 - 0.6) / sqrt(0.21/1000 +
  # se_b^2) with se_b = std(0.58, 0.60, 0.62) / sqrt(3) = 0.011547: z = 5.49, p < 1e-6
  c = evaluation.compare([0.7], [0.58, 0.60, 0.62], ">", n=1000)
  assert c.verdict == "held" and "one value" in c.test
  assert c.statistic == pytest.approx(0.1 / math.sqrt(0.21 / 1000 + 0.011547 ** 2), rel=1e-4)
  assert evaluation.compare([0.58, 0.60, 0.62], 0.7, ">", n=1000).verdict == "did not hold"
  assert evaluation.compare(0.61, [0.58, 0.60, 0.62], ">", n=1000).verdict == "inconclusive"
  with pytest.raises(ValueError, match="needs n"):
    evaluation.compare([0.7], [0.6, 0.61])


def test_report_renders_with_tables_and_rebuild_command(spec):
  study, tmp = spec
  evaluation.run_study(study, log=lambda m: None)
  path = evaluation.render_report(tmp / "results")
  text = open(path).read()
  assert "python -m jaxdefense report" in text
  assert "| `a` | 3 |" in text and "## Provenance" in text
  assert "two-proportion z-test" in text and "Welch" in text
  assert text.count("--force`") == 9
  from jaxdefense.commands import report
  import argparse
  p = argparse.ArgumentParser()
  report.COMMAND.add_arguments(p)
  os.remove(path)
  assert report.COMMAND.run(p.parse_args([str(tmp / "results")]), []) == 0
  assert os.path.exists(path)


def test_end_to_end_tiny_training_study(tmp_path, tiny_overrides):
  """Two real `train_and_evaluate` cells; the second run of the study skips both."""
  import jaxdefense as jd
  tiny = jd.configs.get("demo", [*tiny_overrides, "epochs=1", "model.hidden=(16,)"])

  def run(ctx):
    jd.training.train_and_evaluate(ctx.config, ctx.workdir, verbose=False)
    state, _ = jd.training.restore(ctx.workdir)
    return {"step": int(state.step)}

  base = lambda overrides: jd.configs.override(tiny, overrides)
  study = Study("tiny", base, {"lr1": {"optimizer.learning_rate": 0.05},
                               "lr2": {"optimizer.learning_rate": 0.1}},
                run=run, results_dir=tmp_path / "res", runs_dir=tmp_path / "runs",
                root=tmp_path)
  res = evaluation.run_study(study, log=lambda m: None)
  assert [r["status"] for r in res.records] == ["done", "done"]
  assert res.metrics("lr1")["step"] > 0
  assert os.path.exists(tmp_path / "runs" / "lr2" / "seed0" / "metrics.jsonl")
  seen = []
  evaluation.run_study(study, log=seen.append)
  assert seen == ["== lr1 seed 0: done, skipped", "== lr2 seed 0: done, skipped"]


def test_slurm_array_script_runs_its_grid_entry(spec):
  """``scripts/slurm_study.sh`` as a job array task, the index set by hand."""
  _, tmp = spec
  main = tmp / "spec_main.py"
  main.write_text(SPEC + "\nif __name__ == '__main__':\n  import sys\n"
                  "  from jaxdefense.evaluation import study_main\n"
                  "  sys.exit(study_main(STUDY, sys.argv[1:]))\n")
  script = ROOT / "scripts" / "slurm_study.sh"
  env = {**os.environ, "RESULTS": str(tmp / "results"), "RUNS": str(tmp / "runs"),
         "JAX_PLATFORMS": "cpu", "SLURM_SUBMIT_DIR": str(tmp), "PYTHON": sys.executable}
  env.pop("SLURM_ARRAY_TASK_ID", None)
  proc = subprocess.run(["bash", str(script), str(main)], env=env, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 2 and "SLURM_ARRAY_TASK_ID is not set" in proc.stderr
  proc = subprocess.run(["bash", str(script), str(main)], capture_output=True, text=True,
                        env={**env, "SLURM_ARRAY_TASK_ID": "4"}, timeout=240)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert _calls(tmp) == [("b", 1)]                     # grid entry 4: cell b, seed 1
  rec = evaluation.load_results(tmp / "results").record("b", 1)
  assert rec["argv"].endswith("--index 4")
  proc = subprocess.run(["bash", str(script), str(tmp / "nope.py")], capture_output=True,
                        text=True, env={**env, "SLURM_ARRAY_TASK_ID": "0"}, timeout=60)
  assert proc.returncode == 2 and "no study file" in proc.stderr


def test_metric_paths_reach_keys_that_hold_dots(tmp_path):
  """``"curve.0.02"`` reads ``{"curve": {"0.02": ...}}`` (eps values as keys)."""
  records = [{"cell": "a", "seed": s, "status": "done",
              "metrics": {"curve": {"0.02": 0.5 + s, "0.1": 0.25}, "x.y": 3.0, "n": 100}}
             for s in (0, 1)]
  res = _study.Results(str(tmp_path), {"study": {}, "cells": records})
  assert res.values("a", "curve.0.02") == [0.5, 1.5]
  assert res.values("a", "curve.0.1") == [0.25, 0.25]
  assert res.values("a", "x.y") == [3.0, 3.0]
  assert res.values("a", "curve.0.3") == [] and res.values("a", "nope") == []
  assert res.estimate("a", "curve.0.02").mean == 1.0


def test_study_main_takes_a_make_study_function(tmp_path, capsys):
  """``study_main(make_study)``: ``--quick`` picks ``make_study(True)`` and is removed."""
  made = []

  def make_study(quick):
    made.append(quick)
    cells = {"q": {}} if quick else {"a": {}, "b": {}}
    return Study("toy_quick" if quick else "toy", lambda o: None, cells,
                 run=lambda ctx: {}, results_dir=tmp_path / ("q" if quick else "f"))
  assert evaluation.study_main(make_study, ["list", "--quick"]) == 0
  assert evaluation.study_main(make_study, ["list"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert made == [True, False]
  assert [l.split()[1] for l in out] == ["q", "a", "b"]
  with pytest.raises(TypeError, match="study_main"):
    evaluation.study_main(42, ["list"])


def test_study_for_script_lays_out_full_and_quick_studies(tmp_path):
  """``Study.for_script``: the full study writes beside its script as ``STUDY``; the
  quick one is ``QUICK_STUDY``, passes ``--quick`` in its commands and writes under the
  runs folder, never beside the real results."""
  script = tmp_path / "experiments" / "toy" / "study.py"
  script.parent.mkdir(parents=True)
  script.write_text("")
  full, quick = (Study.for_script("toy", lambda o: None, {"a": {}}, spec=script,
                                  results="results/small", quick=q, run=lambda ctx: {},
                                  root=tmp_path) for q in (False, True))
  assert full.object_name == "STUDY" and full.command_args == ()
  assert full.results_dir == str(script.parent / "results" / "small")
  assert quick.object_name == "QUICK_STUDY" and quick.command_args == ("--quick",)
  assert quick.results_dir == str(tmp_path / "workdirs" / "toy" / "report")
  assert full.runs_dir == quick.runs_dir == str(tmp_path / "workdirs" / "toy")
  assert quick.command("a", 0) == (
      "python experiments/toy/study.py --quick --cell a --seed 0 --force")
  with pytest.raises(TypeError, match="results_dir"):
    Study.for_script("toy", lambda o: None, {"a": {}}, spec=script, results="r",
                     run=lambda ctx: {}, results_dir=tmp_path)
