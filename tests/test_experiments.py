"""The EnResNet and DiffAI study specs: claims and reports on synthetic results."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

from jaxdefense import evaluation
from jaxdefense.evaluation import _study

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(rel, name):
  spec = importlib.util.spec_from_file_location(name, ROOT / rel)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def small():
  return _load("experiments/enresnet/small.py", "enresnet_small")


def _res(clean, fgsm, ifgsm, apgd=None):
  attacks = {"fgsm": fgsm, "ifgsm": ifgsm, "cw": ifgsm + 0.1}
  if apgd is not None:
    attacks["apgd-ce"] = apgd
  return {"clean": clean, "attacks": attacks, "params": 1000, "n": 2000, "train_s": 60.0}


def _results(study, metrics, path):
  cells = [{"cell": n, "seed": 0, "status": "done", "metrics": m, "commit": "abc",
            "command": study.command(n, 0), "machine": {"summary": "test"}}
           for n, m in metrics.items()]
  return _study.Results(str(path), {"study": study.describe(), "cells": cells})


def test_claims_verdicts_follow_the_tests(small, tmp_path):
  m = {"resnet": _res(0.75, 0.5, 0.40), "en1": _res(0.80, 0.55, 0.45, apgd=0.445),
       "en2": _res(0.80, 0.56, 0.50), "en5": _res(0.79, 0.57, 0.46),
       "ens2": _res(0.76, 0.5, 0.41), "swe2": _res(0.77, 0.55, 0.52),
       "blind_resnet_en2": {"accuracy": 0.6, "n": 2000}}
  res = _results(small.STUDY, m, tmp_path / "results.json")
  v = {c.split(" (")[0][:30]: (verdict, e) for c, verdict, e in small.claims(res)}
  by = lambda s: next(x for k, x in v.items() if k.startswith(s))[0]
  assert by("Noise injection") == "held"                # +5 pt on 2000 images: z > 3
  assert by("More ensemble members") == "did not hold"  # En5 significantly below En2
  assert by("A plain ensemble") == "held"
  assert by("Shared-weights") == "held"
  assert by("Blind attacks") == "held"
  assert by("(beyond the paper)") == "inconclusive"     # 0.5 pt inside the 2 pt margin test
  assert "z = " in next(x for k, x in v.items() if k.startswith("Noise"))[1]
  m["en1"] = _res(0.755, 0.55, 0.405)  # within the noise: inconclusive, not "did not hold"
  res = _results(small.STUDY, m, tmp_path / "results.json")
  assert next(vv for c, vv, _ in small.claims(res) if c.startswith("Noise")) == "inconclusive"


def test_enresnet_report_is_written_with_tables_and_plots(small, tmp_path):
  m = {"resnet": {**_res(0.75, 0.5, 0.4), "acc_vs_eps": [[0.0, 0.75], [0.1, 0.4]],
                  "curves": {"train": [[1, 0.2], [2, 0.4]], "validation": [[2, 0.5]]}},
       "en1": {**_res(0.77, 0.55, 0.45), "curves": {"train": [[1, 0.3]], "validation": []}},
       "integration_en1_en2": {"members": ["en1", "en2"], "clean": 0.8, "n": 2000,
                               "attacks": {"fgsm": 0.6, "ifgsm": 0.5}}}
  res = _results(small.STUDY, m, tmp_path / "results.json")
  path = evaluation.write_report(small.STUDY, res, tmp_path)
  text = open(path).read()
  assert "| `resnet` | ResNet (no noise) | 75.0 ± 1.0 | 50.0 ± 1.1 | 40.0 ± 1.1 |" in text
  assert "python -m jaxdefense report" in text and "--cell resnet --seed 0 --force" in text
  assert "Integration of separately trained" in text
  for png in ("training_curves.png", "acc_vs_eps.png"):
    assert os.path.getsize(tmp_path / png) > 1000


def test_committed_results_load_and_keep_their_numbers(small):
  """The converted results hold the numbers of the committed reports."""
  res = evaluation.load_results(ROOT / "experiments/enresnet/results/small")
  assert res.metrics("en1_a0.05")["attacks"]["ifgsm"] == 0.684
  assert res.metrics("resnet")["clean"] == 0.796 and res.done("integration_en1_en2", 0)
  assert all(r["commit"] and r["command"].startswith("python experiments/enresnet/small.py")
             for r in res.records)
  text = (ROOT / "experiments/enresnet/results/small/report.md").read_text()
  assert "| `en1_a0.05` | En1 ResNet, a = 0.05 | 79.6 ± 2.5 | 70.8 ± 2.9 | 68.4 ± 2.9 |" in text
  diffai = evaluation.load_results(ROOT / "experiments/diffai/results")
  assert diffai.metrics("conv_med")["certified_box"] == 0.6231
  assert diffai.record("conv_small", 0)["config"]["model"] == "conv_small"


def test_diffai_report_renders(tmp_path):
  run = _load("experiments/diffai/run.py", "diffai_run")
  res = evaluation.load_results(ROOT / "experiments/diffai/results")
  path = evaluation.write_report(run.STUDY, res, tmp_path)
  text = open(path).read()
  assert "| conv_med | 80.7 % ± 0.4 | 66.9 % ± 0.5 | 62.3 % ± 0.5" in text
  assert "**held**" in text and "two-proportion z-test" in text
