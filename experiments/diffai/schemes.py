"""DiffAI's training schemes compared (the paper's table 2 / figure 5) at CPU scale.

ConvSmall on Fashion-MNIST at eps = 0.1, trained for 6 epochs with each scheme written
in DiffAI's training language (:func:`jaxdefense.objectives.parse`), its schedules
shortened from the paper's 200 epochs (``Lin(0, 1, 150, 10)`` becomes ``Lin(0, 1, 0.5,
3)``: eps held at 0 for half an epoch, then ramped over three, as in ``run.py``), two
seeds per scheme::

  python experiments/diffai/schemes.py                           # run or resume every cell
  python experiments/diffai/schemes.py --cell in_samp --seed 1   # one cell (one process)
  python experiments/diffai/schemes.py list
  python -m jaxdefense report experiments/diffai/schemes_results # rebuild the report
  python experiments/diffai/schemes.py --quick                   # smoke run (own folders)

Each cell trains with its scheme (training code shared with ``run.py``), then measures
standard, PGD-20 and certified box accuracy on the 10,000 test images, the hybrid
zonotope's certified accuracy on the first 2,000 (the same images' box result beside it,
per image, for a paired test), and certified box accuracy against eps on those 2,000.
Certificates are sound for the float32 network (``verify``'s default).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxdefense as jd
from jaxdefense.evaluation import Cell, CellContext, Results, Study, mcnemar
from jaxdefense.evaluation._certified import certified_accuracy
from jaxdefense.models import _diffai
from jaxdefense.objectives import parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _load_run():
  spec = importlib.util.spec_from_file_location("_diffai_run", os.path.join(HERE, "run.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_run = _load_run()

# The paper's schedules Lin(a, b, 150, 10) (hold 150 epochs, ramp over 10) and the
# IFGSM's Lin(0, 1, 20, 20) scaled to a 6-epoch run.
RAMP = "0.5, 3"
ADV_RAMP = "0.5, 1"
BASE = f"Sub(Lin(0, 1, {RAMP}), Box)"
SCHEMES: dict[str, tuple[str, str, dict]] = {
    # name: (the paper's name, language text, ConvSmall field overrides)
    "baseline": ("Baseline", f"Mix(Point, {BASE}, Lin(0, 0.5, {RAMP}))", {}),
    "in_samp": ("InSamp", f"Mix(Point, Sample(Lin(0, 1, {RAMP}), 0.5, Normal, Box), "
                          f"Lin(0, 0.5, {RAMP}))", {}),
    "in_samp_lpa": ("InSampLPA", f"Mix(Point, Sub(Lin(0, 1, {RAMP}), Sample(Lin(0, 1, {RAMP}), "
                                 f"0.5, Normal, Box)), Lin(0, 0.5, {RAMP}))", {}),
    "adv3_is": ("Adv3IS", f"Mix(Sub(Lin(0, 1, {ADV_RAMP}), IFGSM(3)), Sample(Lin(0, 1, {RAMP}), "
                          f"0.5, Normal, Box), Lin(0, 0.5, {RAMP}))", {}),
    # Baseline plus a DeepLoss layer after the second convolution (training only), its
    # terms weighted by a schedule that ramps with eps.
    "deep_loss": ("Baseline + DeepLoss", f"DeepLoss(Lin(0, 0.5, {RAMP}), Mix(Point, {BASE}, "
                                         f"Lin(0, 0.5, {RAMP})))",
                  {"abstract": (("conv1", _diffai.Abstract.of("deep_loss", weight=1.0,
                                                              only_train=True)),)}),
}
EPS_CURVE = (0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15)


def load_config(overrides: dict, quick: bool = False) -> Any:
  """``config.py``'s config with the scheme keys and ``overrides``; ``quick``: smoke size.

  Raises:
    ValueError: an unknown key.
  """
  cfg = _run.load_config({}, quick)
  cfg.scheme = "baseline"
  cfg.zonotope_examples = 50 if quick else 2000
  cfg.deepz_examples = 0
  cfg.curve_examples = 50 if quick else 2000
  for key, value in overrides.items():
    if key not in cfg:
      raise ValueError(f"unknown config key {key!r}; expected one of {sorted(cfg)}.")
    cfg[key] = value
  if cfg.scheme not in SCHEMES:
    raise ValueError(f"unknown scheme {cfg.scheme!r}; expected one of {sorted(SCHEMES)}.")
  return cfg


def run_cell(ctx: CellContext) -> dict:
  """Train ConvSmall with the cell's scheme, then evaluate (see the module docstring)."""
  cfg, quick = ctx.config, ctx.cell.info.get("quick", False)
  logfile = open(os.path.join(ctx.workdir, "log.txt"), "w")

  def log(msg: str) -> None:
    print(msg, flush=True)
    logfile.write(msg + "\n")
    logfile.flush()

  paper_name, text, fields = SCHEMES[cfg.scheme]
  objective = parse(f"DiffAI({text}, eps={cfg.eps * cfg.train_eps_factor:g})")
  train_ds = jd.data.load(cfg.dataset, "train")
  test_ds = jd.data.load(cfg.dataset, "test")
  if quick:
    train_ds, test_ds = _run._Subset(train_ds, 500), _run._Subset(test_ds, 200)
  log(f"{paper_name}: {objective}")
  model, variables, (train_s, train_cpu_s) = _run.train(cfg, cfg.model, train_ds, log,
                                                        objective=objective,
                                                        model_fields=fields)
  cpu0 = time.process_time()
  r = _run.evaluate(cfg, model, variables, test_ds, log)
  n = min(cfg.curve_examples, test_ds.labels.shape[0])
  data = (test_ds.images[:n], test_ds.labels[:n])
  curve = {}
  t = time.time()
  for eps in EPS_CURVE:
    curve[f"{eps:g}"] = certified_accuracy(model, variables, data, eps, "box",
                                           cfg.eval_batch_size, progress=False)
  log("  certified box vs eps: " + ", ".join(f"{k}: {v:.3f}" for k, v in curve.items())
      + f" ({time.time() - t:.0f}s)")
  r.update(scheme=paper_name, objective=str(objective), n_curve=n, box_vs_eps=curve,
           eval_cpu_s=time.process_time() - cpu0, train_s=train_s, train_cpu_s=train_cpu_s,
           params=jd.models.count_params(variables))
  logfile.close()
  return r


# --------------------------------------------------------------------- report
def _pct(res: Results, cell: str, key: str, n: str) -> str:
  return res.estimate(cell, key, n=n).format().replace(" ±", " % ±", 1)


def _claim_rows(res: Results) -> list[list[str]]:
  rows = []

  def cmp(claim, a, b, key, n, relation=">", margin=0.0, what=""):
    if not (res.has(a, key) and res.has(b, key)):
      return
    c = res.compare((a, key), (b, key), relation, n=n, margin=margin)
    ea, eb = res.estimate(a, key, n=n), res.estimate(b, key, n=n)
    rows.append([claim, f"**{c.verdict}**",
                 f"{what}{100 * ea.mean:.1f} vs {100 * eb.mean:.1f} %: {c.evidence()}"])

  cmp('"inclusion sampling alone appears to have a benefit on accuracy": InSamp\'s '
      "standard accuracy above Baseline's", "in_samp", "baseline", "standard", "n_test",
      what="standard ")
  cmp('"... without significant detriment to provable robustness": InSamp\'s certified '
      "(box) accuracy above Baseline's minus 2 points (non-inferiority, margin 2 pt)",
      "in_samp", "baseline", "certified_box", "n_test", margin=-0.02, what="certified box ")
  cmp("Figure 5(a) ranks standard accuracy Baseline (32.9 %) above InSampLPA (30.1 %)",
      "baseline", "in_samp_lpa", "standard", "n_test", what="standard ")
  cmp("Figure 5(a) ranks standard accuracy InSampLPA (30.1 %) above Adv3InSampLPA "
      "(28.2 %): here Adv3IS, the IFGSM scheme", "in_samp_lpa", "adv3_is", "standard",
      "n_test", what="standard ")
  cmp("The IFGSM scheme (Adv3IS) is attacked less than InSamp (its adversarial points "
      "train against PGD)", "adv3_is", "in_samp", "pgd", "n_test", what="PGD ")
  cmp("DeepLoss (section 3.3, \"more precise results in intermediate layers\") raises "
      "certified accuracy over Baseline", "deep_loss", "baseline", "certified_box",
      "n_test", what="certified box ")
  for name in SCHEMES:
    if not res.has(name):
      continue
    paired, total_b, total_a = False, 0, 0
    for seed in res.seeds(name):
      m = res.metrics(name, seed)
      if "box_survivors" in m:
        b_only, a_only, _ = mcnemar(m["box_survivors"], m["zonotope_survivors"])
        paired, total_b, total_a = True, total_b + b_only, total_a + a_only
    if paired:
      # pooled over seeds: the discordant images of every seed (same images each time)
      b_only, a_only, p = mcnemar("1" * total_a + "0" * total_b,
                                  "0" * total_a + "1" * total_b)
      verdict = ("held" if p < 0.05 and total_b > total_a else
                 "did not hold" if p < 0.05 else "inconclusive")
      rows.append([f"{SCHEMES[name][0]}: the hybrid zonotope proves more images than the "
                   "box (DiffAI section 2)", f"**{verdict}**",
                   f"images proved only by the zonotope {total_b}, only by the box "
                   f"{total_a} (all seeds); exact McNemar p = {p:.3g}"])
  return rows


def report(res: Results, out_dir: str, quick: bool = False) -> list[str]:
  """The study's report sections (markdown lines) and ``box_vs_eps.png``."""
  names = [n for n in SCHEMES if res.has(n)]
  if not names:
    return ["No cell is done yet."]
  cfg = load_config({}, quick)
  lines = (["**QUICK SMOKE RUN: numbers meaningless.**", ""] if quick else []) + [
      f"ConvSmall on Fashion-MNIST, eps = {cfg.eps:g} for training and evaluation, "
      f"{cfg.epochs} epochs, batch {cfg.batch_size}, Adam lr {cfg.learning_rate:g} with "
      "cosine decay.  The paper's schedules (200 epochs: `Lin(0, 1, 150, 10)` holds 150 "
      "epochs and ramps over 10) are shortened to `Lin(0, 1, 0.5, 3)` (hold half an epoch, "
      "ramp over three), the IFGSM's `Lin(0, 1, 20, 20)` to `Lin(0, 1, 0.5, 1)`.",
      "",
      "Evaluation: standard accuracy, PGD-20 (step 2.5 eps / 20, one random start) and "
      "certified box accuracy on the 10,000 test images; certified hybrid zonotope (every "
      f"input pixel correlated, box ReLU) on the first {cfg.zonotope_examples}, with the "
      "box on the same images beside it.  Certificates are sound for the float32 network "
      "(outward rounding, `verify`'s default).  Entries: mean ± standard error over seeds "
      "(sample std / sqrt(k)); with one seed, the binomial error over images.",
      "",
  ]
  rows = []
  for name in names:
    seeds = res.seeds(name)
    train = np.mean(res.values(name, "train_cpu_s")) / 60
    rows.append([f"{SCHEMES[name][0]} (`{name}`)", str(len(seeds)),
                 _pct(res, name, "standard", "n_test"), _pct(res, name, "pgd", "n_test"),
                 _pct(res, name, "certified_box", "n_test"),
                 _pct(res, name, "certified_zonotope", "n_zonotope"),
                 _pct(res, name, "certified_box_prefix", "n_zonotope"),
                 f"{train:.1f} min"])
  lines += jd.evaluation.markdown_table(
      ["scheme", "seeds", "standard", "PGD-20", "certified box (10,000)",
       f"certified hybrid zonotope (first {cfg.zonotope_examples})", "box on the same images",
       "train CPU time"], rows)
  lines += ["", "Train CPU time is the training process's CPU time (both cores together), "
            "less sensitive than wall time to the other jobs that shared this machine."]
  lines += ["", "The language text of each scheme:", ""]
  lines += jd.evaluation.markdown_table(
      ["scheme", "objective"], [[SCHEMES[n][0], f"`{res.metrics(n).get('objective', '')}`"]
                                for n in names])
  # certified accuracy against eps
  curve_rows = []
  for name in names:
    cells = []
    for eps in EPS_CURVE:
      e = res.estimate(name, f"box_vs_eps.{eps:g}", n="n_curve")
      cells.append(f"{100 * e.mean:.1f}" if e.k else "–")
    curve_rows.append([SCHEMES[name][0]] + cells)
  lines += ["", f"Certified box accuracy (%) against eps on the first {cfg.curve_examples} "
            "test images (mean over seeds; trained at eps 0.1):", ""]
  lines += jd.evaluation.markdown_table(["scheme"] + [f"{e:g}" for e in EPS_CURVE], curve_rows)
  plot = _plot(res, names, out_dir)
  if plot:
    lines += ["", f"![certified box accuracy against eps]({plot})"]
  claims = _claim_rows(res)
  if claims:
    lines += ["", "## Claims, tested here", "",
              "Quoted claims are from the paper's section 5 (\"Without abstract layers, "
              "inclusion sampling alone appears to have a benefit on accuracy without "
              "significant detriment to provable robustness\") and its figure 5 "
              "(ResNet-Tiny on CIFAR-10, no abstract layers).  Scheme comparisons are "
              "decided by Welch's t-test over seeds (two-sided, alpha = 0.05; with two "
              "seeds a test of little power), the zonotope-vs-box claims by an exact "
              "McNemar test on the same images.", ""]
    lines += jd.evaluation.markdown_table(["claim", "verdict", "evidence"], claims)
  lines += ["", "Raw numbers: `results.json` beside this file."]
  return lines


def _plot(res: Results, names: list[str], out_dir: str) -> str | None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in names:
    means, errs = [], []
    for eps in EPS_CURVE:
      e = res.estimate(name, f"box_vs_eps.{eps:g}", n="n_curve")
      means.append(100 * e.mean)
      errs.append(100 * (e.se if e.se == e.se else 0.0))
    ax.errorbar(EPS_CURVE, means, yerr=errs, marker="o", capsize=3, label=SCHEMES[name][0])
  ax.axvline(0.1, color="grey", lw=0.8, ls=":")
  ax.set_xlabel("eps (l-inf, [0, 1] pixels)")
  ax.set_ylabel("certified accuracy, box (%)")
  ax.set_title("ConvSmall, Fashion-MNIST: certified accuracy vs eps")
  ax.legend()
  fig.tight_layout()
  os.makedirs(out_dir, exist_ok=True)
  fig.savefig(os.path.join(out_dir, "box_vs_eps.png"), dpi=110)
  plt.close(fig)
  return "box_vs_eps.png"


def make_study(quick: bool = False) -> Study:
  """The study: one cell per scheme, seeds 0 and 1; ``quick``: the smoke-scale variant."""
  base = lambda overrides: load_config(overrides, quick)
  base.__qualname__ = "experiments/diffai/schemes.py:load_config" + (" (quick)" if quick else "")
  tag = "diffai_schemes_quick" if quick else "diffai_schemes"
  return Study.for_script(
      tag, base, [Cell(n, {"scheme": n}, description=SCHEMES[n][0], info={"quick": quick})
                  for n in SCHEMES], seeds=(0, 1),
      run=run_cell, report=lambda res, out: report(res, out, quick),
      title="DiffAI's training schemes on ConvSmall, Fashion-MNIST, eps = 0.1 (CPU scale)",
      spec=__file__, results="schemes_results", quick=quick, root=ROOT)


STUDY = make_study(False)
QUICK_STUDY = lambda: make_study(True)  # noqa: E731  (built on demand)


if __name__ == "__main__":
  sys.exit(jd.evaluation.study_main(make_study))   # --quick: make_study(True)
