"""The SONet gradient-masking study spec: its paired tests, verdicts and report, on
synthetic results."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest

from jaxdefense.evaluation import _study

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 400


@pytest.fixture(scope="module")
def study():
  spec = importlib.util.spec_from_file_location("sonet_small",
                                                ROOT / "experiments/sonet/small.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _survivors(rate: float, seed: int, base: str | None = None) -> str:
  """A survivor string with about ``rate`` ones; with ``base``, a subset (or superset)
  of it, so that the pairs are nested as for attacks of increasing strength."""
  rng = np.random.default_rng(seed)
  if base is None:
    return "".join("1" if u < rate else "0" for u in rng.random(N))
  ones = [i for i, c in enumerate(base) if c == "1"]
  keep = set(rng.choice(ones, size=int(rate * N), replace=False)) if rate * N <= len(ones) \
      else set(ones)
  return "".join("1" if i in keep else "0" for i in range(N))


def _cell(survivors: str, **extra) -> dict:
  return {"n": N, "robust": survivors.count("1") / N, "survivors": survivors,
          "stats_clean": {"nfe": 19.0, "num_steps": 3.0, "num_rejected": 0.0},
          "stats_adv": {"nfe": 25.0, "num_steps": 4.0, "num_rejected": 1.0},
          "attack_s": 10.0, **extra}


def _results(study, path, cells):
  records = [{"cell": name, "seed": 0, "status": "done", "metrics": m, "commit": "abc",
              "command": study.STUDY.command(name, 0), "machine": {"summary": "test"}}
             for name, m in cells.items()]
  return _study.Results(str(path), {"study": study.STUDY.describe(), "cells": records})


def test_mcnemar_is_the_exact_binomial_test(study):
  assert study.mcnemar("1111", "1111") == (0, 0, 1.0)
  # 10 discordant pairs, all one way: p = 2 / 2^10
  a, b = "1" * 10 + "0" * 5, "0" * 10 + "0" * 5
  only_b, only_a, p = study.mcnemar(a, b)
  assert (only_b, only_a) == (0, 10) and math.isclose(p, 2 / 2 ** 10)
  # balanced discordance: p = 1
  assert study.mcnemar("1100", "0011")[2] == 1.0


def test_masking_verdicts(study, tmp_path):
  clean = _survivors(0.9, 0)
  resnet_pgd = _survivors(0.05, 1, clean)
  sonet_pgd = _survivors(0.60, 2, clean)     # PGD through dopri5 looks robust...
  cw = _survivors(0.10, 3, sonet_pgd)        # ...CW, SPSA and transfers are not fooled
  spsa = _survivors(0.20, 4, sonet_pgd)
  twin = _survivors(0.08, 5, sonet_pgd)
  weak = sonet_pgd                           # an attack that changes nothing
  cells = {"resnet": _cell(resnet_pgd, clean=0.9, clean_survivors=clean),
           "sonet": _cell(sonet_pgd, clean=0.9, clean_survivors=clean),
           "cw": _cell(cw), "spsa": _cell(spsa), "transfer_twin": _cell(twin),
           "apgd_dlr": _cell(weak)}
  res = _results(study, tmp_path, cells)
  verdicts = {c.split(";")[0][:40]: v for c, v, _ in study.claims(res)}
  got = [v for _, v, _ in study.claims(res)]
  assert got[0] == "held"                     # SONet PGD above ResNet PGD
  assert got[1:4] == ["held", "held", "held"]  # CW, SPSA, transfer below PGD
  assert got[4] == "inconclusive"             # APGD-DLR changed nothing
  assert got[5] == "held", verdicts           # the worst case keeps little of the gain
  lines = study.report(res, str(tmp_path))
  text = "\n".join(lines)
  assert "CW-inf" in text and "**held**" in text and "McNemar" in text
  # the whole report states the paired test once, not the generic z-test paragraph too
  full = open(_study.write_report(study.STUDY, res, tmp_path / "out")).read()
  assert full.count("## Statistics") == 1 and "two-proportion z-test" not in full
  assert "exact two-sided McNemar" in full and "## Provenance" in full


def test_robustness_that_survives_every_attack_is_not_masking(study, tmp_path):
  clean = _survivors(0.9, 10)
  resnet_pgd = _survivors(0.05, 11, clean)
  sonet_pgd = _survivors(0.60, 12, clean)
  cells = {"resnet": _cell(resnet_pgd, clean=0.9, clean_survivors=clean),
           "sonet": _cell(sonet_pgd, clean=0.9, clean_survivors=clean),
           "cw": _cell(sonet_pgd), "spsa": _cell(_survivors(0.595, 13, sonet_pgd))}
  res = _results(study, tmp_path, cells)
  got = [v for _, v, _ in study.claims(res)]
  assert got[1] == "inconclusive" and got[2] == "inconclusive"
  assert got[-1] == "did not hold"
