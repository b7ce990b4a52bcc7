"""The EnResNet second-pass study spec: configs, verdicts and report on synthetic results."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

from jaxdefense.evaluation import _study

ROOT = pathlib.Path(__file__).resolve().parents[1]
JITTER = (-0.004, 0.0, 0.004)


@pytest.fixture(scope="module")
def second():
  spec = importlib.util.spec_from_file_location(
      "enresnet_second", ROOT / "experiments/enresnet/second.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _train(robust, clean, seed):
  j = JITTER[seed % 3]
  return {"clean": clean + j, "n": 2000, "train_s": 600.0, "params": 77562,
          "final_train_accuracy": 0.7 + j, "curves": {"train": [[10, 0.5], [20, 0.7]],
                                                      "validation": [[20, 0.8]]},
          "attacks": {"fgsm": robust + 0.05 + j, "ifgsm": robust + j, "cw": 0.78 + j,
                      "cw_reach": robust - 0.02 + j}}


def _results(second, path, train, blind, fk):
  study = second.STUDY
  records = []
  for n, (r, c) in train.items():
    records += [{"cell": n, "seed": s, "metrics": _train(r, c, s)} for s in study.seeds_of(n)]
  for n, a in blind.items():
    records += [{"cell": n, "seed": s, "metrics": {"accuracy": a + JITTER[s], "n": 2000}}
                for s in study.seeds_of(n)]
  for n, (lg, pr) in fk.items():
    for s in study.seeds_of(n):
      m = {"n": 2000, "draws": [1, 5, 20, 100]}
      for mode, v in (("logits", lg), ("probs", pr)):
        m[mode] = {f"k{k}": {"clean": 0.8 + JITTER[s], "robust": v + JITTER[s]}
                   for k in (1, 5, 20, 100)}
      records.append({"cell": n, "seed": s, "metrics": m})
  for r in records:
    r.update({"status": "done", "commit": "abc", "machine": {"summary": "t"},
              "command": study.command(r["cell"], r["seed"])})
  return _study.Results(str(path), {"study": study.describe(), "cells": records})


def test_grid_configs(second):
  """Seeds, the confound's learning rates, the En2 sweep and the doubled schedule."""
  study = second.STUDY
  assert study.seeds_of("en2") == (0, 1, 2) and study.seeds_of("fk_en5") == (0, 1, 2)
  c = study.config("en5_sum", 0)
  assert c.ensemble.size == 5 and np.isclose(c.optimizer.learning_rate, 0.5)
  assert np.isclose(c.optimizer.weight_decay, 1e-4)
  c = study.config("en2_long", 1)
  assert c.epochs == 12 and tuple(c.schedule.milestones) == (8, 10) and c.seed == 1
  c = study.config("en2_a0.8", 0)
  assert c.ensemble.size == 2 and c.model.step.coef == 0.8
  assert study.config("swe2", 0).ensemble.shared
  assert {("resnet", "en5"), ("en5", "resnet")} <= set(second.BLIND)
  quick = second.make_study(True).config("en2_long", 0)
  assert quick.epochs == 3 and quick.train_size == 512


def test_verdicts_and_report(second, tmp_path):
  train = {"resnet": (0.60, 0.80), "en1": (0.66, 0.83), "en2": (0.55, 0.80),
           "en5": (0.50, 0.78), "swe2": (0.60, 0.80), "en2_a0.05": (0.55, 0.80),
           "en2_a0.4": (0.555, 0.79), "en2_a0.8": (0.45, 0.75), "en2_sum": (0.65, 0.82),
           "en2_long": (0.56, 0.80), "en5_sum": (0.66, 0.82), "en5_long": (0.503, 0.78)}
  blind = {"blind_resnet_en1": 0.70, "blind_en1_resnet": 0.66,
           "blind_resnet_en2": 0.70, "blind_en2_resnet": 0.66,
           "blind_resnet_en5": 0.60, "blind_en5_resnet": 0.66}
  fk = {"fk_en1": (0.60, 0.62), "fk_en2": (0.55, 0.55)}
  res = _results(second, tmp_path, train, blind, fk)
  got = {c.split(" (")[0][:40]: v for c, v, _ in second.claims(res)}
  verdicts = [v for _, v, _ in second.claims(res)]
  # En1 above ResNet: held; En2/En5 above ResNet: against (robust lower); blind: en5
  # part against; SWE: inconclusive (equal); sigma: flat to 0.4 and drop at 0.8: held
  assert verdicts == ["held", "did not hold", "did not hold", "inconclusive", "held"], got
  text = "\n".join(second.report(res, str(tmp_path)))
  for needle in ("C&W, paper budget", "0.015", "Noise coefficient on En2",
                 "ensemble-size confound", "en5_sum above en5: **held**",
                 "en5_long above en5: **inconclusive**", "resnet -> en5",
                 "Feynman–Kac averaging", "robust K=100", "probabilities vs logits"):
    assert needle in text, needle
  assert (tmp_path / "training_curves.png").exists()


def test_attack_names(second):
  names = second._attack_names({"fgsm(eps=0.1)": 0.5, "ifgsm(steps=20)": 0.4,
                                "cw(steps=50)": 0.7, "cw(steps=100, lr=0.01)": 0.3})
  assert names == {"fgsm": 0.5, "ifgsm": 0.4, "cw": 0.7, "cw_reach": 0.3}
