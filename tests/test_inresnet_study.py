"""The In-ResNet small study spec: its claims' verdicts and its report, on synthetic results."""

from __future__ import annotations

import importlib.util
import os
import pathlib

import numpy as np
import pytest

from jaxdefense import evaluation
from jaxdefense.evaluation import _study

ROOT = pathlib.Path(__file__).resolve().parents[1]
JITTER = (-0.004, 0.0, 0.004)   # per-seed spread: s.e. about 0.2 points


@pytest.fixture(scope="module")
def small():
  spec = importlib.util.spec_from_file_location("inresnet_small",
                                                ROOT / "experiments/inresnet/small.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _metrics(small, clean, noise, pgd2, seed, damping=None):
  j = JITTER[seed % len(JITTER)]
  attacks = {f"{a}@{r}": pgd2 + j + (0.1 if r == "1" else 0.0) - (0.1 if r == "4" else 0.0)
             for a in ("fgsm", "ifgsm", "pgd") for r in small.RADIUS_NAMES}
  kinds = {k: noise + j for k in small.NOISE}
  return {"clean": clean + j, "n": 2000, "attacks": attacks, "noise_pooled": noise + j,
          "noise_kind": kinds, "noise_severity": {str(s): noise + j for s in small.SEVERITIES},
          "noise": {k: {str(s): noise + j for s in small.SEVERITIES} for k in small.NOISE},
          "damping": damping, "params": 270000, "train_s": 240.0}


def _rows(values):
  return [{"block": f"block{i}", "path": [f"block{i}"], "kind": "relu", "mean": v, "std": 0.0,
           "min": v, "max": v, "count": 1} for i, v in enumerate(values)]


def _results(small, path, cells):
  """``cells``: name -> (clean, noise, pgd2, damping) or a metrics dict for one seed."""
  study = small.STUDY
  records = []
  for name, spec in cells.items():
    for seed in study.seeds_of(name):
      m = spec if isinstance(spec, dict) else _metrics(small, *spec[:3], seed, spec[3])
      records.append({"cell": name, "seed": seed, "status": "done", "metrics": m,
                      "commit": "abc", "command": study.command(name, seed),
                      "machine": {"summary": "test"}})
  return _study.Results(str(path), {"study": study.describe(), "cells": records})


def _analysis():
  coords = np.linspace(-8, 8, 5).tolist()
  land = {"coords": coords, "loss": np.ones((2, 5, 5)).tolist(),
          "pred": np.zeros((2, 5, 5), int).tolist()}
  spec = {"block_sigma": np.full((3, 9, 1), 1.5).tolist(), "feature_sigma": [[4.0]] * 3,
          "product_bound": [38.4] * 3, "lyapunov": [0.15] * 3}
  return {"landscape": {"resnet": land, "inresnet": land},
          "spectrum": {"resnet": spec, "inresnet": spec}}


class _Verdicts(dict):
  """claim text -> verdict, looked up by the start of the quoted claim."""

  def __getitem__(self, start):
    hits = [v for c, v in self.items() if c.startswith(start)]
    assert len(hits) == 1, (start, list(self))
    return hits[0]


def _verdicts(small, res):
  return _Verdicts({c.split("\"")[1]: v for c, v, _ in small.claims(res)})


def test_in_resnet_claims_follow_the_tests(small, tmp_path):
  damp = _rows([0.2, 0.5, 0.0, 0.9, 0.3, 1.4])
  cells = {"resnet": (0.90, 0.40, 0.30, None),
           "inresnet": (0.885, 0.60, 0.45, damp),
           "lambda_inresnet": (0.89, 0.58, 0.40, _rows([0.1] * 6)),
           "inresnet_sig": (0.90, 0.42, 0.31, _rows([0.02] * 6)),
           "gating": (0.90, 0.40, 0.30, _rows([0.2] * 6)),
           "gating_sig": (0.88, 0.50, 0.35, _rows([0.3] * 6))}
  v = _verdicts(small, _results(small, tmp_path / "results.json", cells))
  assert v["For perturbed CIFAR-10 im"] == "held (higher); held (by > 15 points)"
  assert v["there is accuracy drop wit"] == "held"        # -1.5 pt, above the -3 pt margin
  assert v["our In-ResNet-110 and In-"] == "held"         # +15 pt under attack
  assert v["In-ResNet-110 leads to th"] == "held"
  assert v["the performance of In-Res"].startswith("held")  # gating == resnet exactly
  # 15 of 18 blocks (3 seeds) in [0, 1] and above 0.01: Wilson interval 61-94 %
  assert v["most of the interpolation"] == "held (in [0, 1]); held (above 0.01)"

  # The same differences inside the seed noise: inconclusive, never "did not hold".
  cells["inresnet"] = (0.90, 0.401, 0.301, _rows([0.5, 1.5]))
  v = _verdicts(small, _results(small, tmp_path / "results.json", cells))
  assert v["For perturbed CIFAR-10 im"] == "inconclusive (higher); did not hold (by > 15 points)"
  assert v["our In-ResNet-110 and In-"] == "inconclusive"
  # 3 of 6 in [0, 1]: inconclusive; 6 of 6 above 0.01: interval 61-100 %
  assert v["most of the interpolation"] == "inconclusive (in [0, 1]); held (above 0.01)"
  # A significant drop of 10 points fails the "within 3 percent" claim.
  cells["inresnet"] = (0.80, 0.60, 0.45, damp)
  v = _verdicts(small, _results(small, tmp_path / "results.json", cells))
  assert v["there is accuracy drop wit"] == "did not hold"


def test_ensemble_claim_compares_one_value_with_its_members(small, tmp_path):
  cells = {"resnet": (0.90, 0.40, 0.30, None),
           "ensemble_resnet": {"clean": 0.93, "n": 2000, "noise_pooled": 0.45,
                               "attacks": {"fgsm@2": 0.35, "ifgsm@2": 0.35, "pgd@2": 0.35}}}
  v = _verdicts(small, _results(small, tmp_path / "results.json", cells))
  assert v["all of the ensemble models"] == "held"
  cells["ensemble_resnet"] = {**cells["ensemble_resnet"], "clean": 0.85}
  v = _verdicts(small, _results(small, tmp_path / "results.json", cells))
  assert v["all of the ensemble models"] == "did not hold"


def test_wilson_interval_is_defined_at_the_ends(small):
  p, lo, hi = small._wilson(18, 18)
  assert p == 1.0 and 0.8 < lo < 0.83 and hi == pytest.approx(1.0)
  p, lo, hi = small._wilson(5, 10)
  assert lo < 0.5 < hi and hi - 0.5 == pytest.approx(0.5 - lo)


def test_in_resnet_report_has_tables_claims_and_plots(small, tmp_path):
  cells = {"resnet": (0.90, 0.40, 0.30, None),
           "inresnet": (0.885, 0.60, 0.45, _rows([0.2, 0.5, 0.0, 0.9, 0.3, 1.4])),
           "lambda_inresnet": (0.89, 0.58, 0.40, _rows([0.1] * 6)),
           "analysis": _analysis()}
  res = _results(small, tmp_path / "results.json", cells)
  path = evaluation.write_report(small.STUDY, res, tmp_path)
  text = open(path).read()
  assert "| ResNet-20 | 3 | 90.0 ± 0.2 | 40.0 ± 0.2 |" in text
  assert "## Learned damping coefficients" in text and "| In-ResNet-20 | 18 |" in text
  assert "## Jacobian spectra" in text and "| ResNet-20 | 1.500 | 1.500 | 38.4 | 4 |" in text
  assert "**held" in text and "Welch" in text
  assert "--cell inresnet --seed 2 --force" in text
  for png in ("accuracy_curves.png", "damping_hist.png", "loss_landscapes.png",
              "jacobian_spectra.png"):
    assert os.path.getsize(tmp_path / png) > 1000, png


def test_margin_evidence_gives_the_raw_difference_and_the_claimed_bound(small, tmp_path):
  cells = {"resnet": (0.90, 0.40, 0.30, None), "inresnet": (0.905, 0.41, 0.31, None),
           "lambda_inresnet": (0.88, 0.41, 0.31, None)}
  res = _results(small, tmp_path / "results.json", cells)
  text = next(e for c, _, e in small.claims(res) if "accuracy drop" in c)
  assert "In-ResNet: difference +0.5 pt (claimed > -3.0 pt: +3.5 pt beyond it)" in text
  assert "λ-In-ResNet: difference -2.0 pt (claimed > -3.0 pt: +1.0 pt beyond it)" in text
