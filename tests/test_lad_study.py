"""The LAD small study spec: verdicts and report on synthetic results."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from jaxdefense.evaluation import _study

ROOT = pathlib.Path(__file__).resolve().parents[1]
JITTER = (-0.004, 0.0, 0.004)


@pytest.fixture(scope="module")
def small():
  spec = importlib.util.spec_from_file_location("lad_small", ROOT / "experiments/lad/small.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _metrics(small, robust, seed):
  j = JITTER[seed % 3]
  attacks = {a: robust + j + (0.05 if a in ("fgsm", "cw") else 0.0) for a in small.ATTACKS}
  return {"clean": 0.8 + j, "attacks": attacks, "worst": min(attacks.values()), "n": 2000,
          "train_s": 600.0 * (1.3 if robust > 0.5 else 1.0), "diagnose": "no sign"}


def _results(small, path, cells):
  study = small.STUDY
  records = [{"cell": n, "seed": s, "status": "done", "metrics": _metrics(small, r, s),
              "commit": "abc", "command": study.command(n, s), "machine": {"summary": "t"}}
             for n, r in cells.items() for s in study.seeds_of(n)]
  return _study.Results(str(path), {"study": study.describe(), "cells": records})


def test_verdicts(small, tmp_path):
  res = _results(small, tmp_path, {"pgd": 0.50, "lad_pgd": 0.55, "lad_sm_pgd": 0.60,
                                   "trades": 0.52, "lad_trades": 0.50, "lad_sm_trades": 0.52,
                                   "lad_pgd_eta0.1": 0.56})
  got = [v for _, v, _ in small.claims(res)]
  assert got == ["held", "did not hold", "held"]
  text = "\n".join(small.report(res, str(tmp_path)))
  assert "1.30x pgd" in text and "eta_sweep.png" in text and "LAD-SM + TRADES" in text
  assert (tmp_path / "eta_sweep.png").exists()


def test_every_objective_config_is_valid(small):
  for name in small.RUNS:
    cfg = small.STUDY.config(name, 0) if hasattr(small.STUDY, "config") else None
    if cfg is None:
      cfg = small.config_for({"objective": small.RUNS[name][1]})
    import jaxdefense as jd
    obj = jd.objectives.from_config(cfg.objective)
    assert type(obj).__name__ in ("PGDAdversarial", "TRADES", "LAD")
