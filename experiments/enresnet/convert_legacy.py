"""One-off: convert the pre-runner ``results/small/results.json`` to the study format.

  python experiments/enresnet/convert_legacy.py

Reads every committed version of the old file from ``git log`` (the newest old-format
version holds the numbers), and writes ``results/small/results.json`` in the format of
:func:`jaxdefense.evaluation.run_study`: one record per cell (seed 0) with its metrics
unchanged, the commit that first recorded those numbers, the command that recomputes
the cell on the runner, and the config resolved by today's code (the runs' own
``config.json`` were not committed).  It was run once; its output is committed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import small  # noqa: E402  (this folder's study spec)
from jaxdefense.evaluation import _study  # noqa: E402

REL = "experiments/enresnet/results/small/results.json"


def _git(*args: str) -> str:
  return subprocess.run(["git", "-C", small.ROOT, *args], capture_output=True, text=True,
                        check=True).stdout


def history() -> list[tuple[str, dict]]:
  """``(commit, old-format results)`` for every committed version, oldest first."""
  out = []
  for sha in reversed(_git("log", "--format=%H", "--", REL).split()):
    data = json.loads(_git("show", f"{sha}:{REL}"))
    if "format" not in data:
      out.append((sha, data))
  if not out:
    raise SystemExit(f"no pre-runner version of {REL} in git history")
  return out


def first_commit(versions: list[tuple[str, dict]], get) -> str:
  """The oldest commit from which ``get(data)`` equals its final value."""
  final = get(versions[-1][1])
  sha = versions[-1][0]
  for commit, data in reversed(versions):
    if get(data) != final:
      break
    sha = commit
  return sha


def convert() -> dict:
  versions = history()
  last_sha, old = versions[-1]
  meta = old["meta"]
  machine = {"summary": meta["machine"], "machine": meta["machine"].split(",")[0],
             "cpu_count": int(meta["machine"].split(", ")[1].split()[0]), "jax": "0.10.2"}
  study = small.STUDY
  imported = {"from": "the pre-runner `small.py` results.json, last at commit "
                      f"{last_sha[:10]}", "source_commit": last_sha,
              "last_invocation": meta["command"],
              "config_note": "config resolved by the runner's code at conversion; the runs' "
                             "own config.json were not committed"}
  records = []
  for name, _ in small.RUNS.items():
    r = dict(old["results"][name])
    metrics = {**r, "n": meta["n_eval"], "train_s": meta["train_s"][name],
               "curves": old.get("curves", {}).get(name)}
    if "acc_vs_eps" in r:
      metrics["n_curve"] = meta["n_curve"]
    timings = {"train_s": meta["train_s"][name], "eval_s": r.get("eval_s")}
    sha = first_commit(versions, lambda d, n=name: d["results"].get(n))
    records.append((name, sha, metrics, timings, f"workdirs/enresnet_small/{name}"))
  for o, t in small.BLIND_PAIRS:
    k = f"{o}->{t}"
    sha = first_commit(versions, lambda d, k=k: d.get("blind", {}).get(k))
    records.append((f"blind_{o}_{t}", sha, {"accuracy": old["blind"][k], "n": meta["n_eval"]},
                    {}, None))
  integ = old["integration"]
  sha = first_commit(versions, lambda d: d.get("integration"))
  records.append(("integration_" + "_".join(small.INTEGRATION), sha,
                  {**integ, "n": meta["n_eval"]}, {}, None))
  cells = []
  for name, sha, metrics, timings, workdir in records:
    cell = study.cell(name)
    cells.append({"cell": name, "seed": 0, "status": "done", "commit": sha, "dirty": None,
                  "command": study.command(cell, 0), "argv": None,
                  "overrides": _study._jsonable(dict(cell.overrides)),
                  "config": _study._jsonable(study.config(cell, 0)), "metrics": metrics,
                  "timings": timings, "machine": machine, "workdir": workdir,
                  "imported": imported})
  return _study._jsonable({"format": _study.FORMAT, "study": study.describe(),
                           "cells": cells})


if __name__ == "__main__":
  data = convert()
  path = os.path.join(small.HERE, "results", "small", "results.json")
  _study._write_json(path, data)
  print(f"wrote {path}: {len(data['cells'])} cells")
  for c in data["cells"]:
    print(f"  {c['cell']:28s} {c['commit'][:10]}  {c['command']}")
