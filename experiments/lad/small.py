"""LAD at CPU scale: layer-wise adversarial defence on top of PGD-AT and TRADES.

A study on the experiment runner (:mod:`jaxdefense.evaluation`)::

  python experiments/lad/small.py                          # run or resume every missing cell
  python experiments/lad/small.py --cell lad_pgd --seed 1   # one cell
  python experiments/lad/small.py list                     # the grid and each cell's status
  python -m jaxdefense report experiments/lad/results/small    # rebuild the report
  python experiments/lad/small.py --quick                  # smoke run (own folders)

Training cells (``small_config.py``: Fashion-MNIST, pre-activation ResNet-8, eps 0.1,
PGD-5 inner attack), 3 seeds each: ``pgd`` (PGD-AT), ``lad_pgd`` (LAD, Lie–Trotter),
``lad_sm_pgd`` (LAD-SM, Strang–Marchuk), ``trades``, ``lad_trades``, ``lad_sm_trades``
(LAD at eta = 0.05, sign-normalised adjoints).  An eta sweep of LAD-PGD (seed 0).
Every run is evaluated on the first 2,000 test images: natural accuracy, FGSM, PGD-20,
CW-inf, APGD-CE and APGD-DLR at eps 0.1 (the strongest attacks we have, so that a gain is
not masking); the LAD runs of seed 0 also get ``evaluation.diagnose``.  The report
tests the introduction's claims by Welch's t-test over seeds.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from jaxdefense import _xla_flags

if not _xla_flags.backend_started():
  os.environ["XLA_FLAGS"] = _xla_flags.with_recommended_cpu_flags(os.environ.get("XLA_FLAGS"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxdefense as jd  # noqa: E402
from jaxdefense.evaluation import Cell, CellContext, Results, Study  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BASE = os.path.join(HERE, "small_config.py")
EPS = 0.1
SEEDS = (0, 1, 2)
ETA = 0.05
ETA_SWEEP = (0.01, 0.02, 0.1, 0.2)
ATTACKS = ("fgsm", "pgd", "cw", "apgd-ce", "apgd-dlr")
SUITE = (f"fgsm,pgd:steps=20,step_size={EPS / 4},cw:steps=30,apgd-ce:steps=50,"
         "apgd-dlr:steps=50")
# scale -> (test images, batch, diagnose images)
EVAL = {"full": (2000, 500, 256), "quick": (64, 64, 16)}

_PGD = {"eps": EPS, "step_size": EPS / 4, "steps": 5}
_TRADES = {"name": "trades", "beta": 6.0, "eps": EPS, "step_size": EPS / 4, "steps": 5}


def _lad(base: str, splitting: str, eta: float = ETA) -> dict:
  fields = dict(_PGD) if base == "pgd" else {k: v for k, v in _TRADES.items() if k != "name"}
  return {"name": "lad", "base": base, "splitting": splitting, "eta": eta, **fields}


# name -> (description, objective config, seeds)
RUNS: dict[str, tuple[str, dict, tuple[int, ...]]] = {
    "pgd": ("PGD-AT", {"name": "pgd", **_PGD}, SEEDS),
    "lad_pgd": ("LAD (Lie–Trotter) + PGD-AT", _lad("pgd", "lie_trotter"), SEEDS),
    "lad_sm_pgd": ("LAD-SM (Strang–Marchuk) + PGD-AT", _lad("pgd", "strang_marchuk"), SEEDS),
    "trades": ("TRADES", dict(_TRADES), SEEDS),
    "lad_trades": ("LAD + TRADES", _lad("trades", "lie_trotter"), SEEDS),
    "lad_sm_trades": ("LAD-SM + TRADES", _lad("trades", "strang_marchuk"), SEEDS),
}
for _eta in ETA_SWEEP:
  RUNS[f"lad_pgd_eta{_eta:g}"] = (f"LAD + PGD-AT, eta {_eta:g}", _lad("pgd", "lie_trotter", _eta),
                                  (0,))


def config_for(overrides: dict, quick: bool = False) -> Any:
  """``small_config.py`` (``:quick``: one inner step) with ``overrides``."""
  c = jd.configs.override(jd.configs.load_file(BASE, "quick" if quick else None), overrides)
  if quick:
    c.objective.steps = 1
  return jd.configs.validate(c)


def train_and_eval(ctx: CellContext) -> dict:
  """Train (or resume), then the white-box evaluation at eps 0.1."""
  jd.training.train_and_evaluate(ctx.config, ctx.workdir)
  n, batch, n_diag = EVAL[ctx.cell.info.get("scale", "full")]
  test = jd.data.load(ctx.config.dataset, "test").take(n)
  x, y = np.asarray(test.images), np.asarray(test.labels)
  model, _, _ = jd.evaluation.run_logits_fn(ctx.workdir, which="best")
  t = time.time()
  rep = jd.evaluation.evaluate_robustness(model, x, y, key=jax.random.key(1), eps=EPS,
                                          suite=SUITE, batch_size=batch, progress=True)
  attacks = {k.split("(")[0]: v for k, v in rep.attacks.items()}
  out = {"clean": rep.clean, "attacks": attacks, "worst": min(attacks.values()),
         "n": int(len(y)), "eval_s": time.time() - t,
         "train_s": jd.training.train_seconds(ctx.workdir),
         "steps": int(ctx.config.epochs * -(-ctx.config.train_size // ctx.config.batch_size))}
  if ctx.cell.name.startswith("lad") and ctx.seed == 0:
    d = jd.evaluation.diagnose(model, x[:n_diag], y[:n_diag], key=jax.random.key(3), eps=EPS,
                               batch_size=batch, spsa_steps=20, spsa_samples=32,
                               progress=True)
    out["diagnose"] = d.to_text()
  return out


# ----------------------------------------------------------------- report
def _verdict(comparisons: list) -> str:
  verdicts = [c.verdict for c in comparisons]
  if "did not hold" in verdicts:
    return "did not hold"
  return "held" if verdicts and all(v == "held" for v in verdicts) else "inconclusive"


CLAIMS = (
    ("\"layer-wise adversarial defense which improves adversarial training by a noticeable "
     "margin\"; tested on PGD-AT: LAD and LAD-SM above PGD-AT", "pgd",
     ("lad_pgd", "lad_sm_pgd")),
    ("\"our methods consistently improve adversarial model robustness on top of widely-used "
     "strong adversarial training techniques\"; tested on TRADES: LAD and LAD-SM above "
     "TRADES", "trades", ("lad_trades", "lad_sm_trades")),
)


def claims(res: Results) -> list[tuple[str, str, str]]:
  """Welch's t-test over seeds, two-sided, alpha 0.05, on PGD-20 and on the worst
  attack per run (the minimum over the five attacks)."""
  out = []
  cmp = lambda a, b, k: res.compare((a, k), (b, k), ">", n="n")
  for words, base, lads in CLAIMS:
    have = [m for m in lads if res.has(m)]
    if not res.has(base) or not have:
      continue
    parts = [(m, k, cmp(m, base, k)) for m in have for k in ("attacks.pgd", "worst")]
    out.append((words + " (robust accuracy under PGD-20 and under the worst of five "
                "attacks)", _verdict([p for _, _, p in parts]),
                "; ".join(f"{m} {'PGD-20' if k == 'attacks.pgd' else 'worst'}: "
                          f"{p.evidence()}" for m, k, p in parts)))
  pairs = [(sm, lt) for sm, lt in (("lad_sm_pgd", "lad_pgd"), ("lad_sm_trades", "lad_trades"))
           if res.has(sm) and res.has(lt)]
  if pairs:
    parts = [(sm, cmp(sm, lt, "worst")) for sm, lt in pairs]
    out.append(("(the issue's reading; the introduction only proposes both schemes) "
                "Strang–Marchuk splitting beats Lie–Trotter: LAD-SM above LAD on the worst "
                "attack", _verdict([p for _, p in parts]),
                "; ".join(f"{sm}: {p.evidence()}" for sm, p in parts)))
  return out


def _plot_eta(res: Results, path: str) -> bool:
  points = [(0.0, "pgd")] + [(ETA, "lad_pgd")] + [(e, f"lad_pgd_eta{e:g}") for e in ETA_SWEEP]
  points = sorted((e, c) for e, c in points if res.has(c))
  if len(points) < 2:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.6))
  for key, label in (("clean", "natural"), ("attacks.pgd", "PGD-20"), ("worst", "worst of 5")):
    est = [res.estimate(c, key, n="n") for _, c in points]
    ax.errorbar([e for e, _ in points], [100 * v.mean for v in est],
                [100 * v.se for v in est], marker="o", ms=3, capsize=2, label=label)
  ax.set(xlabel="eta (0 = PGD-AT)", ylabel="accuracy (%)",
         title="LAD + PGD-AT: accuracy against eta (seed 0 beyond eta 0.05)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def report(res: Results, out_dir: str, quick: bool = False) -> list[str]:
  cfg = config_for({}, quick)
  lines = ["**QUICK SMOKE RUN: numbers meaningless.**", ""] if quick else []
  lines += [
      "## Setup", "",
      f"- Fashion-MNIST, {cfg.train_size} training images, pre-activation ResNet-8, "
      f"{cfg.epochs} epochs, adversarial training at eps {EPS} (PGD-5, step eps/4); "
      f"TRADES beta 6; LAD eta {ETA} with sign-normalised adjoints at every hidden state "
      "(`jaxdefense.objectives.LAD`).",
      f"- Evaluation: first {max((res.metrics(n).get('n', 0) for n in RUNS if res.has(n)), default=0)} "
      f"test images, eps {EPS}: {SUITE}. 'worst' is the lowest of the five accuracies of a "
      "run. Mean ± s.e. over seeds (one seed: binomial).", "",
      "## Accuracy (%)", ""]
  est = lambda n, k: res.estimate(n, k, n="n").format()
  rows = []
  for name, (label, _, _) in RUNS.items():
    if not res.has(name):
      continue
    train_min = np.mean([res.metrics(name, s).get("train_s", 0.0) for s in res.seeds(name)]) / 60
    rows.append([label, len(res.seeds(name)), est(name, "clean")] +
                [est(name, f"attacks.{a}") for a in ATTACKS] + [est(name, "worst"),
                                                                f"{train_min:.1f}"])
  lines += jd.evaluation.markdown_table(
      ["run", "seeds", "natural"] + [a.upper() for a in ATTACKS] + ["worst", "train min"],
      rows)
  overhead = []
  for lad, base in (("lad_pgd", "pgd"), ("lad_sm_pgd", "pgd"), ("lad_trades", "trades"),
                    ("lad_sm_trades", "trades")):
    if res.has(lad) and res.has(base):
      t = lambda n: np.mean([res.metrics(n, s).get("train_s", 0.0) for s in res.seeds(n)])
      overhead.append(f"{lad}: {t(lad) / max(t(base), 1e-9):.2f}x {base}")
  if overhead:
    lines += ["", "Training-time overhead (time in training steps, mean over seeds): "
              + "; ".join(overhead) + ". The cells ran at different times on a shared "
              "machine, so these ratios carry its load; `python benchmarks/lad_overhead.py` "
              "times the six objectives' training steps side by side in interleaved rounds "
              "(figures in BENCHMARKS.md)."]
  lines += ["", "## Claims, tested here", "",
            "Welch's t-test over seeds, two-sided, alpha = 0.05; a claim of several parts "
            "holds when every part does and fails when any part is significantly against "
            "it.", ""]
  lines += jd.evaluation.markdown_table(["claim and test", "verdict", "evidence"],
                                        [[c, f"**{v}**", e] for c, v, e in claims(res)])
  diag = [(n, res.metrics(n, 0)["diagnose"]) for n in RUNS
          if res.has(n) and 0 in res.seeds(n) and res.metrics(n, 0).get("diagnose")]
  if diag:
    lines += ["", "## evaluation.diagnose (seed 0 of each LAD run)", ""]
    for n, text in diag:
      lines += [f"### {RUNS[n][0]}", "", "```", text, "```", ""]
  if _plot_eta(res, os.path.join(out_dir, "eta_sweep.png")):
    lines += ["", "## Plots", "", "- `eta_sweep.png`: accuracy against eta (LAD + PGD-AT)."]
  lines += ["", "Raw numbers: `results.json` beside this file."]
  return lines


def make_study(quick: bool = False) -> Study:
  info = {"scale": "quick" if quick else "full"}
  seeds = lambda s: s[:2] if quick else s
  cells = [Cell(n, {"objective": obj}, description=d, info=info, seeds=seeds(s))
           for n, (d, obj, s) in RUNS.items()]
  tag = "lad_small_quick" if quick else "lad_small"
  base = lambda overrides: config_for(overrides, quick)
  base.__qualname__ = ("experiments/lad/small_config.py" + (":quick" if quick else "")
                       + " + overrides")
  return Study.for_script(
      tag, base, cells, seeds=SEEDS, run=train_and_eval,
      report=lambda res, out: report(res, out, quick),
      title="LAD, small scale: Fashion-MNIST, adversarial training",
      spec=__file__, results="results/small", quick=quick, root=ROOT)


STUDY = make_study(False)
QUICK_STUDY = lambda: make_study(True)  # noqa: E731


if __name__ == "__main__":
  sys.exit(jd.evaluation.study_main(make_study))   # --quick: make_study(True)
