"""One-off: convert the pre-runner ``results/results.json`` to the study format.

  python experiments/diffai/convert_legacy.py

Both networks were trained and evaluated in one invocation (``python
experiments/diffai/run.py``), committed at the commit that first recorded the file; the
conversion keeps every metric, records that commit, the command that recomputes each
cell on the runner and each cell's resolved config (the old config with ``model`` set),
and keeps the invocation's totals under ``legacy_totals``.  Run once; output committed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (this folder's study spec)
from jaxdefense.evaluation import _study  # noqa: E402

REL = "experiments/diffai/results/results.json"


def _git(*args: str) -> str:
  return subprocess.run(["git", "-C", run.ROOT, *args], capture_output=True, text=True,
                        check=True).stdout


def convert() -> dict:
  versions = []
  for sha in reversed(_git("log", "--format=%H", "--", REL).split()):
    data = json.loads(_git("show", f"{sha}:{REL}"))
    if "format" not in data:
      versions.append((sha, data))
  if not versions:
    raise SystemExit(f"no pre-runner version of {REL} in git history")
  last_sha, old = versions[-1]
  study = run.STUDY
  machine = {"summary": "x86_64, 2 CPU cores", "machine": "x86_64", "cpu_count": 2,
             "jax": "0.10.2"}
  cells = []
  for name in run.MODELS:
    r = old["results"][name]
    sha = next(s for s, d in versions if d["results"].get(name) == r)
    config = {k: v for k, v in old["config"].items() if k != "models"}
    config["model"] = name
    cell = study.cell(name)
    cells.append({
        "cell": name, "seed": 0, "status": "done", "commit": sha, "dirty": None,
        "command": study.command(cell, 0), "argv": old["command"],
        "overrides": dict(cell.overrides), "config": config, "metrics": r,
        "timings": {k: r[k] for k in r if k.startswith("time_") or k.endswith("_s")},
        "machine": machine, "workdir": None,
        "imported": {"from": f"the pre-runner `run.py` results.json, last at commit "
                             f"{last_sha[:10]}", "source_commit": last_sha}})
  return _study._jsonable({
      "format": _study.FORMAT, "study": study.describe(), "cells": cells,
      "legacy_totals": {"command": old["command"], "total_s": old["total_s"],
                        "total_cpu_s": old["total_cpu_s"]}})


if __name__ == "__main__":
  data = convert()
  path = os.path.join(HERE, "results", "results.json")
  _study._write_json(path, data)
  print(f"wrote {path}: {len(data['cells'])} cells")
  for c in data["cells"]:
    print(f"  {c['cell']:12s} {c['commit'][:10]}  {c['command']}")
