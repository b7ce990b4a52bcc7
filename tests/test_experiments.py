"""The EnResNet experiment's report generator, on synthetic results (no training)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small():
  path = ROOT / "experiments" / "enresnet" / "small.py"
  spec = importlib.util.spec_from_file_location("enresnet_small", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _res(clean, fgsm, ifgsm, apgd=None):
  attacks = {"fgsm": fgsm, "ifgsm": ifgsm, "cw": ifgsm + 0.1}
  if apgd is not None:
    attacks["apgd-ce"] = apgd
  return {"clean": clean, "attacks": attacks, "params": 1000}


def test_claims_verdicts_follow_the_numbers(small):
  res = {"resnet": _res(0.75, 0.5, 0.40), "en1": _res(0.77, 0.55, 0.45, apgd=0.445),
         "en2": _res(0.78, 0.56, 0.47), "en5": _res(0.79, 0.57, 0.46),
         "ens2": _res(0.76, 0.5, 0.41), "swe2": _res(0.77, 0.55, 0.455)}
  verdicts = {c.split(" (")[0][:30]: v for c, v, _ in small.claims(res, {"resnet->en2": 0.6})}
  by_start = lambda s: next(v for k, v in verdicts.items() if k.startswith(s))
  assert by_start("Noise injection") == "held"
  assert by_start("More ensemble members") == "did not hold"  # En5 < En2 here
  assert by_start("A plain ensemble") == "held"
  assert by_start("Shared-weights") == "held"
  assert by_start("Blind attacks") == "held"
  assert by_start("(beyond the paper)") == "held"
  res["en1"] = _res(0.70, 0.55, 0.45)  # natural accuracy below the ResNet's
  verdicts = {c: v for c, v, _ in small.claims(res, {})}
  assert next(v for c, v in verdicts.items() if c.startswith("Noise injection")) == \
      "did not hold"


def test_report_is_written_with_tables_and_plots(small, tmp_path):
  runs = tmp_path / "runs"
  (runs / "resnet").mkdir(parents=True)
  rows = [{"kind": "train", "step": s, "train/accuracy": 0.1 * s} for s in range(1, 6)]
  rows.append({"kind": "epoch", "step": 5, "validation/accuracy": 0.5})
  (runs / "resnet" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  res = {"resnet": {**_res(0.75, 0.5, 0.4), "acc_vs_eps": [[0.0, 0.75], [0.1, 0.4]]},
         "en1": _res(0.77, 0.55, 0.45)}
  meta = {"command": "python experiments/enresnet/small.py", "machine": "test",
          "wall_s": 60.0, "train_s": {"resnet": 30.0}, "n_eval": 500, "n_curve": 300}
  path = small.write_report(str(tmp_path / "out"), str(runs), res, {},
                            {"members": ["resnet", "en1"], "clean": 0.8,
                             "attacks": {"fgsm": 0.6, "ifgsm": 0.5}}, meta, False)
  text = open(path).read()
  assert "| `resnet` | ResNet (no noise) | 75.0 | 50.0 | 40.0 |" in text
  assert "Integrating separately trained" in text and "**held**" in text
  for png in ("training_curves.png", "acc_vs_eps.png"):
    assert os.path.getsize(tmp_path / "out" / png) > 1000


def test_report_carries_over_runs_trained_elsewhere(small, tmp_path):
  """A partial re-run on a machine without the old run folders extends the report."""
  out, runs = tmp_path / "out", tmp_path / "runs"
  (runs / "en1").mkdir(parents=True)
  rows = [{"kind": "train", "step": s, "accuracy": 0.1 * s} for s in range(1, 6)]
  rows.append({"kind": "epoch", "step": 5, "validation/accuracy": 0.5})
  (runs / "en1" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  out.mkdir()
  old_curves = {"train": [[1, 0.2], [2, 0.4]], "validation": [[2, 0.5]]}
  (out / "results.json").write_text(json.dumps({
      "results": {"resnet": _res(0.75, 0.5, 0.4), "en1": _res(0.1, 0.1, 0.1)},
      "blind": {"resnet->en1": 0.42}, "integration": None,
      "meta": {"train_s": {"resnet": 120.0, "en1": 1.0}}, "curves": {"resnet": old_curves}}))
  res = {"en1": _res(0.77, 0.55, 0.45)}  # evaluated now: wins over the old numbers
  blind_res: dict = {}
  integration, carried, curves, train_s = small.carry_over(
      str(out / "results.json"), res, blind_res, None)
  assert carried == ["resnet"] and res["en1"]["clean"] == 0.77
  assert res["resnet"]["clean"] == 0.75 and blind_res == {"resnet->en1": 0.42}
  assert curves == {"resnet": old_curves} and train_s == {"resnet": 120.0}
  meta = {"command": "python experiments/enresnet/small.py --only en1", "machine": "test",
          "wall_s": 60.0, "train_s": {"resnet": 120.0, "en1": 30.0}, "n_eval": 250,
          "n_curve": 150, "carried_over": carried}
  path = small.write_report(str(out), str(runs), res, blind_res, integration, meta, False,
                            curves)
  text = open(path).read()
  assert "Carried over from the `results.json`" in text and "`resnet`" in text
  assert "| `resnet` | ResNet (no noise) | 75.0 |" in text and "| `en1` |" in text
  assert "validation accuracy per epoch, every run." in text
  saved = json.loads((out / "results.json").read_text())
  assert set(saved["curves"]) == {"resnet", "en1"}
  # a run without curves anywhere: an existing plot is kept, and the report says so
  png = out / "training_curves.png"
  before = png.read_bytes()
  write = lambda: small.write_report(str(out), str(tmp_path / "none"), res, blind_res,
                                     None, meta, False, {"resnet": old_curves})
  text = open(write()).read()
  assert png.read_bytes() == before and "had no curves of `en1`, so it kept the plot" in text
