"""The DiffAI scheme-comparison study spec (issue 14 part 4): its schemes parse, its
config and claims, and the report on synthetic results; plus the shared McNemar test."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest

from jaxdefense import evaluation
from jaxdefense.evaluation import _study
from jaxdefense.objectives import parse

ROOT = pathlib.Path(__file__).resolve().parents[1]
N, NZ = 10_000, 400


@pytest.fixture(scope="module")
def schemes():
  spec = importlib.util.spec_from_file_location("diffai_schemes",
                                                ROOT / "experiments/diffai/schemes.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_scheme_parses_and_prints_back(schemes):
  for name, (_, text, _) in schemes.SCHEMES.items():
    obj = parse(f"DiffAI({text}, eps=0.1)")
    assert parse(str(obj)) == obj, name
  # the paper's presets and ours differ only in the schedules' epochs
  assert schemes.SCHEMES["baseline"][1].replace("0.5, 3", "150, 10") == \
      "Mix(Point, Sub(Lin(0, 1, 150, 10), Box), Lin(0, 0.5, 150, 10))"


def test_config_rejects_unknown_keys_and_schemes(schemes):
  cfg = schemes.load_config({"scheme": "in_samp"})
  assert cfg.zonotope_examples == 2000 and cfg.deepz_examples == 0
  with pytest.raises(ValueError, match="unknown config key"):
    schemes.load_config({"nope": 1})
  with pytest.raises(ValueError, match="unknown scheme"):
    schemes.load_config({"scheme": "InSamp"})


def _survivors(rate, seed):
  rng = np.random.default_rng(seed)
  return "".join("1" if u < rate else "0" for u in rng.random(NZ))


def _metrics(std, cert, seed, zono_gain=0):
  box = _survivors(cert, seed)
  zono = "".join("1" if (c == "1" or i < zono_gain) else "0" for i, c in enumerate(box))
  return {"n_test": N, "standard": std, "pgd": std - 0.1, "certified_box": cert,
          "n_zonotope": NZ, "certified_zonotope": zono.count("1") / NZ,
          "certified_box_prefix": box.count("1") / NZ, "box_survivors": box,
          "zonotope_survivors": zono, "n_curve": NZ, "train_s": 120.0 + seed,
          "train_cpu_s": 200.0 + seed,
          "objective": "DiffAI(...)",
          "box_vs_eps": {f"{e:g}": max(0.0, cert - 2 * (e - 0.1)) for e in (
              0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15)}}


def test_report_decides_the_claims(schemes, tmp_path):
  cells = {  # name: (standard per seed, certified per seed, zonotope gain)
      "baseline": ((0.78, 0.781), (0.58, 0.582), 0),
      "in_samp": ((0.80, 0.801), (0.575, 0.577), 40),
      "in_samp_lpa": ((0.76, 0.762), (0.57, 0.571), 0),
      "adv3_is": ((0.74, 0.90), (0.55, 0.56), 0),
  }
  records = [{"cell": name, "seed": s, "status": "done", "commit": "abc",
              "metrics": _metrics(std[s], cert[s], s, gain),
              "command": schemes.STUDY.command(name, s), "machine": {"summary": "test"}}
             for name, (std, cert, gain) in cells.items() for s in (0, 1)]
  res = _study.Results(str(tmp_path), {"study": schemes.STUDY.describe(), "cells": records})
  text = "\n".join(schemes.report(res, str(tmp_path)))
  rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
          for line in text.splitlines() if line.startswith("| ") and "**" in line}
  verdict = lambda start: next(v for k, v in rows.items() if k.startswith(start))
  assert verdict('"inclusion sampling alone') == "**held**"          # 80.0 vs 78.0, tiny spread
  assert verdict('"... without significant') == "**held**"           # -0.4 pt, margin 2
  assert verdict("Figure 5(a) ranks standard accuracy Baseline") == "**held**"
  assert verdict("Figure 5(a) ranks standard accuracy InSampLPA") == "**inconclusive**"
  assert verdict("InSamp: the hybrid zonotope") == "**held**"         # 80 discordant, one way
  assert verdict("Baseline: the hybrid zonotope") == "**inconclusive**"  # none discordant
  assert "DeepLoss" not in "".join(rows)                             # cell not run: no claim
  assert (tmp_path / "box_vs_eps.png").exists()
  # the eps curve (keys such as "0.02" hold a dot) is read per seed: mean of 58.0, 58.2
  curve = next(line for line in text.splitlines()
               if line.startswith("| Baseline | ") and "DiffAI(" not in line)
  assert "| 58.1 |" in curve and "–" not in curve
  assert "| Baseline (`baseline`) | 2 |" in text


def test_mcnemar_on_strings_and_bools():
  assert evaluation.mcnemar("1111", "1111") == (0, 0, 1.0)
  a, b = "1" * 10 + "0" * 5, "0" * 15
  only_b, only_a, p = evaluation.mcnemar(a, b)
  assert (only_b, only_a) == (0, 10) and math.isclose(p, 2 / 2 ** 10)
  assert evaluation.mcnemar(np.array([c == "1" for c in a]), [0] * 15) == (0, 10, p)
  assert evaluation.mcnemar("1100", "0011")[2] == 1.0
  # 7 vs 1 discordant: two-sided exact p = 2 * (1 + 8) / 2^8
  assert math.isclose(evaluation.mcnemar("1" * 7 + "0", "0" * 7 + "1")[2], 18 / 256)
  with pytest.raises(ValueError, match="same images"):
    evaluation.mcnemar("10", "1")
  with pytest.raises(ValueError, match="0/1"):
    evaluation.mcnemar("12", "10")
