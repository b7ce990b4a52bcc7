"""EnResNet at CPU scale: Fashion-MNIST, PGD adversarial training, the paper's evaluation.

  python experiments/enresnet/small.py                 # train what is missing, evaluate, report
  python experiments/enresnet/small.py --only resnet,en2
  python experiments/enresnet/small.py --report-only   # rebuild the report from saved results
  python experiments/enresnet/small.py --quick         # smoke run (minutes; separate folders)

Every run of :data:`RUNS` is a ``jaxdefense.training.train_and_evaluate`` run in
``--runs`` (default ``workdirs/enresnet_small/NAME``, resumable: a killed run continues
where it stopped, a finished one is not retrained).  Each trained model is then
evaluated once on the first ``--eval-examples`` test images (best-validation
checkpoint; results cached in the run folder as ``small_eval.json``):

* white-box FGSM and IFGSM-20 (step eps/4, as the paper's 2/255 at 8/255) on every
  run, and on the ResNet and En1 the paper's C&W (l-inf, tanh space, Adam lr 6e-4,
  c = 10, kappa = 0) and APGD-CE (50 steps) beyond the paper; every gradient through a
  noisy model is averaged over 5 noise draws (EOT);
* IFGSM-20 accuracy against eps (the curve in ``acc_vs_eps.png``);
* blind attacks (IFGSM-20 crafted on one model, evaluated on another) between the
  plain ResNet and the noisy ensembles;
* the naturally trained ResNet / En1 pair: the paper's gradient-masking check (IFGSM
  should drive both to near 0 %).

The report (``results/small/report.md`` next to this file, plus PNG plots and
``results.json``) states which of the paper's qualitative claims held here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Callable

from jaxdefense import _xla_flags

if not _xla_flags.backend_started():
  os.environ["XLA_FLAGS"] = _xla_flags.with_recommended_cpu_flags(os.environ.get("XLA_FLAGS"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxdefense as jd  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

EPS = 0.1  # l-inf radius on Fashion-MNIST pixels in [0, 1] (training and evaluation)

# name -> (description, config overrides).  Every run: pre-activation ResNet-8 (one
# residual block per stage, widths 16/32/64: the paper's ResNet-20 with 1 instead of 3
# blocks per stage), PGD-AT at EPS.
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet": ("ResNet (no noise)", {}),
    "en1": ("En1 ResNet (a = 0.1)", {"model.step.name": "euler_maruyama"}),
    "en2": ("En2 ResNet (a = 0.1)", {"model.step.name": "euler_maruyama", "ensemble.size": 2}),
    "en5": ("En5 ResNet (a = 0.1)", {"model.step.name": "euler_maruyama", "ensemble.size": 5}),
    "ens2": ("2 x ResNet, no noise (plain ensemble)", {"ensemble.size": 2}),
    "swe2": ("2 x En1 shared weights (SWE)",
             {"model.step.name": "euler_maruyama", "ensemble.size": 2, "ensemble.shared": True}),
    "en1_a0.05": ("En1 ResNet, a = 0.05",
                  {"model.step.name": "euler_maruyama", "model.step.coef": 0.05}),
    "en1_a0.4": ("En1 ResNet, a = 0.4",
                 {"model.step.name": "euler_maruyama", "model.step.coef": 0.4}),
    "en1_a0.8": ("En1 ResNet, a = 0.8",
                 {"model.step.name": "euler_maruyama", "model.step.coef": 0.8}),
    "nat_resnet": ("ResNet, natural training", {"objective": {"name": "natural"}}),
    "nat_en1": ("En1 ResNet, natural training",
                {"model.step.name": "euler_maruyama", "objective": {"name": "natural"}}),
}
SIGMA_RUNS = ("en1_a0.05", "en1", "en1_a0.4", "en1_a0.8")
CURVE_RUNS = ("resnet", "en1")
CW_RUNS = ("resnet", "en1")
BLIND_PAIRS = (("resnet", "en1"), ("resnet", "en2"), ("resnet", "en5"), ("en1", "resnet"))
APGD_RUNS = ("resnet", "en1")
INTEGRATION = ("en1", "en2")  # separately trained, logits averaged (Table 5)


def base(quick: bool) -> Any:
  c = jd.configs.base_config()
  c.dataset = "fashion_mnist"
  c.validation_size = 1000
  c.train_size = 12000
  c.batch_size = 128
  c.eval_batch_size = 500
  c.epochs = 6
  c.augment.enabled = True
  c.augment.pad = 2
  c.augment.flip = True
  c.model.name = "preact_resnet8"
  c.model.step.coef = 0.1
  c.model.step.std = "batch"
  c.objective = {"name": "pgd", "eps": EPS, "step_size": EPS / 4, "steps": 5}
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "piecewise"
  c.schedule.milestones = (4, 5)   # the paper's 80/120 of 200, shortened
  c.checkpoint.keep_best = True
  c.log_every_steps = 10
  c.progress_bar = True
  if quick:
    c.train_size, c.validation_size, c.epochs, c.schedule.milestones = 512, 256, 2, (1,)
    c.objective.steps = 2
  return c


def config_for(name: str, quick: bool) -> Any:
  c = base(quick)
  for key, value in RUNS[name][1].items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return jd.configs.validate(c)


# ----------------------------------------------------------------- evaluation
class Model:
  """A trained run as the attacks see it: deterministic f(x) or an EOT-wrapped f(x, key)."""

  def __init__(self, workdir: str):
    fn, stochastic, config = jd.evaluation.run_logits_fn(workdir, which="best")
    self.fn, self.stochastic, self.config = fn, stochastic, config
    self.attack_fn = jd.attacks.eot(fn, 5) if stochastic else fn

  def predict(self, x: jax.Array, key: jax.Array) -> jax.Array:
    logits = self.fn(x, key) if self.stochastic else self.fn(x)
    return jnp.argmax(logits, -1)


def _batched_accuracy(fn: Callable[[Any, Any, Any], Any], x: np.ndarray, y: np.ndarray,
                      key: jax.Array, batch: int) -> float:
  correct = 0
  for i, s in enumerate(range(0, len(y), batch)):
    xb, yb = jnp.asarray(x[s:s + batch]), jnp.asarray(y[s:s + batch])
    correct += int(jnp.sum(fn(xb, yb, jax.random.fold_in(key, i)) == yb))
  return correct / len(y)


def evaluate_run(name: str, workdir: str, x: np.ndarray, y: np.ndarray, args: Any) -> dict:
  path = os.path.join(workdir, "small_eval.json")
  if os.path.exists(path) and not args.reevaluate:
    with open(path) as f:
      out = json.load(f)
    out["attacks"] = {k.split("(")[0]: v for k, v in out["attacks"].items()}
    return out
  m = Model(workdir)
  suite = (f"fgsm,ifgsm:steps=20,step_size={EPS / 4}" + (",cw" if name in CW_RUNS else "")
           + (",apgd-ce:steps=50" if name in APGD_RUNS else ""))
  t = time.time()
  rep = jd.evaluation.evaluate_robustness(
      m.fn, x, y, key=jax.random.key(1), eps=EPS, suite=suite, stochastic=m.stochastic,
      eot_samples=5, batch_size=args.batch, progress=True,
      meta={"run": name, "dataset": "fashion_mnist"})
  attacks = {k.split("(")[0]: v for k, v in rep.attacks.items()}  # "ifgsm(steps=20..)"
  out = {"clean": rep.clean, "attacks": attacks, "eval_s": time.time() - t,
         "stochastic": m.stochastic, "n": int(len(y))}
  if name in CURVE_RUNS:
    out["acc_vs_eps"] = jd.evaluation.accuracy_vs_eps(
        m.fn, x[:args.curve_examples], y[:args.curve_examples], key=jax.random.key(2),
        eps_values=(0.0, 0.05, 0.1, 0.15, 0.2),
        attack="ifgsm:steps=20", stochastic=m.stochastic, eot_samples=5,
        batch_size=args.batch)
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  return out


def integrate(runs_dir: str, names: tuple[str, ...], x: np.ndarray, y: np.ndarray,
              args: Any) -> dict:
  """White-box FGSM / IFGSM-20 (EOT) on the logit average of separately trained runs."""
  path = os.path.join(runs_dir, "integration.json")
  if os.path.exists(path) and not args.reevaluate:
    with open(path) as f:
      return json.load(f)
  models = [Model(os.path.join(runs_dir, n)) for n in names]
  stochastic = any(m.stochastic for m in models)
  fns = [(m.fn if m.stochastic else (lambda a, k, f=m.fn: f(a))) for m in models]
  combined = jd.models.average_logits(fns) if stochastic else jd.models.average_logits(
      [m.fn for m in models])
  rep = jd.evaluation.evaluate_robustness(
      combined, x, y, key=jax.random.key(4), eps=EPS,
      suite=f"fgsm,ifgsm:steps=20,step_size={EPS / 4}", stochastic=stochastic,
      eot_samples=5, batch_size=args.batch, progress=True)
  out = {"members": list(names), "clean": rep.clean,
         "attacks": {k.split("(")[0]: v for k, v in rep.attacks.items()}}
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  return out


def blind(oracle: Model, target: Model, x: np.ndarray, y: np.ndarray, batch: int) -> float:
  """Accuracy of ``target`` on IFGSM-20 examples crafted (with EOT) on ``oracle``."""
  attack = jax.jit(lambda a, b, k: jd.attacks.ifgsm(oracle.attack_fn, a, b, key=k, eps=EPS,
                                                    step_size=EPS / 4, steps=20))

  def correct(xb, yb, k):
    k1, k2 = jax.random.split(k)
    return target.predict(attack(xb, yb, k1), k2)

  return _batched_accuracy(correct, x, y, jax.random.key(3), batch)


# ----------------------------------------------------------------- report
def _pct(v: float | None) -> str:
  return "–" if v is None else f"{100 * v:.1f}"


def _curves(runs_dir: str, names: list[str]) -> dict:
  """Per run ``{"train": [[step, acc], ...], "validation": [[step, acc], ...]}``.

  Read from each run's ``metrics.jsonl``; kept in ``results.json`` so that a report
  rebuilt where the run folders are gone still has them.
  """
  out = {}
  for n in names:
    p = os.path.join(runs_dir, n, "metrics.jsonl")
    if os.path.exists(p):
      rows = jd.training.read_metrics(p)
      out[n] = {"train": [[r["step"], r["accuracy"]] for r in rows
                          if r.get("kind") == "train" and "accuracy" in r],
                "validation": [[r["step"], r["validation/accuracy"]] for r in rows
                               if "validation/accuracy" in r]}
  return out


def plot_training(curves: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for ax in axes:
    ax.set_prop_cycle(color=plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2])
  for name, c in curves.items():
    tr, va = c["train"], c["validation"]
    if tr:
      s, a = zip(*tr)
      k = max(1, len(a) // 12)
      sm = np.convolve(a, np.ones(k) / k, mode="valid")
      axes[0].plot(s[k - 1:], 100 * sm, label=name)
    if va:
      s, a = zip(*va)
      axes[1].plot(s, 100 * np.asarray(a), marker="o", ms=3, label=name)
  axes[0].set_title("training accuracy (PGD examples; nat_*: clean), smoothed", fontsize=10)
  axes[1].set_title("validation accuracy (clean)")
  for ax in axes:
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_sigma(results: dict, path: str) -> None:
  import matplotlib
  import matplotlib.ticker
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  pts = [(RUNS_COEF[n], results[n]) for n in SIGMA_RUNS if n in results]
  if not pts:
    return
  fig, ax = plt.subplots(figsize=(5, 3.5))
  a = [p[0] for p in pts]
  ax.plot(a, [100 * p[1]["clean"] for p in pts], marker="o", label="natural")
  for att, label in (("fgsm", "FGSM"), ("ifgsm", "IFGSM-20"), ("cw", "C&W")):
    ys = [100 * p[1]["attacks"].get(att, np.nan) for p in pts]
    if np.isfinite(ys).sum() > 1:  # an attack run on a single coefficient is no curve
      ax.plot(a, ys, marker="o", label=label)
  ax.set_xscale("log")
  # ticks at the swept coefficients only: default log minor labels overlap here
  ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(a))
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([f"{v:g}" for v in a]))
  ax.set_xlabel("noise coefficient a")
  ax.set_ylabel("accuracy (%)")
  ax.set_title("En1 ResNet-8, PGD-AT, F-MNIST eps 0.1")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


RUNS_COEF = {"en1_a0.05": 0.05, "en1": 0.1, "en1_a0.4": 0.4, "en1_a0.8": 0.8}


def claims(res: dict, blind_res: dict, integration: dict | None = None
           ) -> list[tuple[str, str, str]]:
  """(claim, verdict, evidence) for the paper's qualitative claims that this grid tests."""
  out = []

  def have(*names):
    return all(n in res for n in names)

  def acc(n, k):
    return res[n]["clean"] if k == "clean" else res[n]["attacks"].get(k)

  if have("resnet", "en1"):
    d_nat = acc("en1", "clean") - acc("resnet", "clean")
    d_rob = acc("en1", "ifgsm") - acc("resnet", "ifgsm")
    ok = d_nat > 0 and d_rob > 0
    out.append(("Noise injection (En1) improves both natural and IFGSM-20 robust accuracy "
                "over the ResNet (Table 1)", "held" if ok else "did not hold",
                f"natural {d_nat * 100:+.1f} pt, IFGSM-20 {d_rob * 100:+.1f} pt"))
  if have("en1", "en2", "en5"):
    r = [acc(n, "ifgsm") for n in ("en1", "en2", "en5")]
    ok = r[0] <= r[1] <= r[2]
    out.append(("More ensemble members (En1 < En2 < En5) give higher robust accuracy (Table 1)",
                "held" if ok else "did not hold",
                "IFGSM-20 " + " / ".join(_pct(v) for v in r) + " %"))
  if have("ens2", "en2"):
    d = acc("en2", "ifgsm") - acc("ens2", "ifgsm")
    out.append(("A plain ensemble of 2 ResNets without noise is clearly less robust than En2 "
                "(section 3.3)", "held" if d > 0.005 else "did not hold",
                f"En2 minus plain ensemble: IFGSM-20 {d * 100:+.1f} pt, natural "
                f"{(acc('en2', 'clean') - acc('ens2', 'clean')) * 100:+.1f} pt"))
  if have("resnet", "swe2", "en1"):
    d = acc("swe2", "ifgsm") - acc("resnet", "ifgsm")
    d1 = acc("swe2", "ifgsm") - acc("en1", "ifgsm")
    out.append(("Shared-weights ensembles (2 x En1) beat the ResNet, and averaging noise draws "
                "adds a little over En1 (Table 7)", "held" if d > 0 and d1 >= 0 else
                "did not hold", f"SWE minus ResNet {d * 100:+.1f} pt, SWE minus En1 "
                f"{d1 * 100:+.1f} pt (IFGSM-20)"))
  sig = [n for n in SIGMA_RUNS if n in res]
  if "en1_a0.8" in sig and len(sig) >= 3:
    r = {n: acc(n, "ifgsm") for n in sig}
    small = [r[n] for n in sig if n != "en1_a0.8"]
    ok = max(small) - min(small) < 0.03 and r["en1_a0.8"] < min(small)
    out.append(("Robust accuracy is flat for a up to 0.4 and drops at a = 0.8 "
                "(Table 6: 0.05 / 0.1 / 0.4 / 0.8)", "held" if ok else "did not hold",
                "IFGSM-20 " + ", ".join(f"a={RUNS_COEF[n]}: {_pct(r[n])} %" for n in sig)))
  if have("nat_resnet", "nat_en1"):
    r = [acc(n, "ifgsm") for n in ("nat_resnet", "nat_en1")]
    f = [acc(n, "fgsm") for n in ("nat_resnet", "nat_en1")]
    out.append(("Naturally trained EnResNets fall to near 0 % under IFGSM-20 (no gradient "
                "masking), yet resist FGSM better than the naturally trained ResNet (sec. 3.3)",
                "held" if max(r) < 0.05 and f[1] > f[0] else "did not hold",
                f"IFGSM-20 {_pct(r[0])} / {_pct(r[1])} %, FGSM {_pct(f[0])} / {_pct(f[1])} % "
                "(ResNet / En1)"))
  if ("resnet->en2" in blind_res and "en2" in res and "resnet" in res):
    b = blind_res["resnet->en2"]
    out.append(("Blind attacks crafted on the ResNet are weaker on En2 than white-box ones "
                "(Table 2)", "held" if b > acc("en2", "ifgsm") else "did not hold",
                f"En2 on ResNet-crafted IFGSM-20 {_pct(b)} % vs white-box "
                f"{_pct(acc('en2', 'ifgsm'))} %"))
  if integration and have(*integration["members"]):
    best = max(acc(n, "ifgsm") for n in integration["members"])
    v = integration["attacks"]["ifgsm"]
    out.append(("Integrating separately trained EnResNets (logit average) is more robust "
                "than its best member (Table 5)", "held" if v > best else "did not hold",
                f"IFGSM-20 {_pct(v)} % vs best member {_pct(best)} %"))
  if have("en1") and "apgd-ce" in res["en1"]["attacks"]:
    d = res["en1"]["attacks"]["ifgsm"] - res["en1"]["attacks"]["apgd-ce"]
    out.append(("(beyond the paper) APGD-CE with EOT is not much stronger than IFGSM-20 on "
                "En1, i.e. IFGSM-20 was not overestimating robustness",
                "held" if d < 0.02 else "did not hold", f"IFGSM-20 minus APGD-CE: "
                f"{d * 100:+.1f} pt"))
  return out


def write_report(out_dir: str, runs_dir: str, res: dict, blind_res: dict,
                 integration: dict | None, meta: dict, quick: bool,
                 previous_curves: dict | None = None) -> str:
  """Write ``report.md``, the plots and ``results.json`` into ``out_dir``.

  ``previous_curves``: training curves of runs carried over from an earlier
  ``results.json`` (their run folders are not here).  ``training_curves.png`` is
  rewritten only when the curves of every reported run are at hand; otherwise the
  existing plot is kept and the report says which runs it lacks.
  """
  os.makedirs(out_dir, exist_ok=True)
  names = [n for n in RUNS if n in res]
  train_curves = {**(previous_curves or {}), **_curves(runs_dir, names)}
  train_curves = {n: train_curves[n] for n in names if n in train_curves}
  curves_png = os.path.join(out_dir, "training_curves.png")
  missing_curves = [n for n in names if n not in train_curves]
  if not missing_curves or not os.path.exists(curves_png):
    plot_training(train_curves, curves_png)
    curves_note = "every run" if not missing_curves else (
        "every run but " + ", ".join(f"`{n}`" for n in missing_curves))
  else:
    curves_note = ("as drawn by an earlier invocation: this one had no curves of "
                   + ", ".join(f"`{n}`" for n in missing_curves) + ", so it kept the plot, "
                   "which may lack the runs added since")
  curves = {RUNS[n][0]: [tuple(p) for p in res[n]["acc_vs_eps"]]
            for n in names if "acc_vs_eps" in res[n]}
  if curves:
    jd.evaluation.plot_accuracy_vs_eps(curves, os.path.join(out_dir, "acc_vs_eps.png"),
                                       title="IFGSM-20 (EOT-5) accuracy vs eps, F-MNIST")
  plot_sigma(res, os.path.join(out_dir, "sigma_sweep.png"))
  cfg = base(quick)
  lines = [
      "# EnResNet, small scale: Fashion-MNIST, PGD adversarial training" +
      (" (QUICK SMOKE RUN: numbers meaningless)" if quick else ""),
      "",
      "Command that reproduces everything (trains what is missing, evaluates what is not "
      "cached, writes this folder): `python experiments/enresnet/small.py`" +
      ("" if meta["command"].strip() == "python experiments/enresnet/small.py" else
       f"; this file was last written by `{meta['command']}`, which trains and evaluates "
       "subsets of the same runs into the same folders (the runs were trained in several "
       "invocations of `--train-only --only ...`)") + "." +
      ("" if not meta.get("carried_over") else
       " Carried over from the `results.json` of an earlier invocation (their run folders "
       "were not on the machine that wrote this file): "
       + ", ".join(f"`{n}`" for n in meta["carried_over"]) + "."),
      "",
      f"Machine: {meta['machine']}; jax {jax.__version__}. Wall time of this invocation "
      f"{meta['wall_s'] / 60:.1f} min; time in training steps, all runs: "
      f"{sum(meta['train_s'].values()) / 60:.1f} min (the machine was shared with test "
      f"and benchmark jobs part of the time, so per-run times are noisy).",
      "",
      "## Setup",
      "",
      f"- Data: Fashion-MNIST, the first {cfg.train_size} training images after a "
      f"{cfg.validation_size}-image validation hold-out (best-validation checkpoint), "
      f"random crop (pad {cfg.augment.pad}) and flip; evaluation on the first "
      f"{meta['n_eval']} test images (accuracy-vs-eps curves: the first "
      f"{meta['n_curve']}).",
      "- Model: pre-activation ResNet-8 (the paper's ResNet-20 with one residual block per "
      "stage instead of three; widths 16/32/64). EnResNet: Euler-Maruyama step "
      "x + F(x) + a * std(x + F(x)) * N(0, I), std over the batch tensor as in the authors' "
      "code, noise in training and at test time.",
      f"- Training: PGD-AT at eps {EPS} ({cfg.objective.steps} steps of eps/4, random "
      f"start), SGD lr {cfg.optimizer.learning_rate} momentum 0.9, weight decay 5e-4 "
      f"(L2), divided by 10 at epochs {tuple(cfg.schedule.milestones)} of {cfg.epochs}, "
      f"batch {cfg.batch_size}. The paper: CIFAR-10, 10 steps, 200 epochs.",
      f"- Evaluation at eps {EPS}: FGSM, IFGSM-20 (step eps/4), the paper's C&W (l-inf, 50 "
      f"Adam steps, lr 6e-4, c = 10) and APGD-CE (50 steps) on {' and '.join(CW_RUNS)} only "
      "(CPU time); noisy models are "
      "attacked with EOT over 5 draws and classified with one fresh draw.",
      "- One seed per configuration (the paper's own Table 6 shows a spread of +-0.3 to "
      "+-0.9 points over 5 seeds); see the note on sampling noise above the claims table.",
      "",
      "## White-box accuracy (%)",
      "",
      "| run | model | natural | FGSM | IFGSM-20 | C&W | APGD-CE | params | train min |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for n in names:
    r = res[n]
    a = r["attacks"]
    lines.append(f"| `{n}` | {RUNS[n][0]} | {_pct(r['clean'])} | {_pct(a.get('fgsm'))} | "
                 f"{_pct(a.get('ifgsm'))} | {_pct(a.get('cw'))} | {_pct(a.get('apgd-ce'))} | "
                 f"{r.get('params', 0):,} | {meta['train_s'].get(n, 0) / 60:.1f} |")
  if integration:
    a = integration["attacks"]
    parts = " + ".join(f"`{n}`" for n in integration["members"])
    lines += ["", "## Integration of separately trained models (Table 5 analogue)", "",
              f"Logits of {parts} averaged (each trained on its own); white-box with EOT.", "",
              "| model | natural | FGSM | IFGSM-20 |", "|---|---|---|---|",
              f"| {parts} | {_pct(integration['clean'])} | {_pct(a.get('fgsm'))} | "
              f"{_pct(a.get('ifgsm'))} |"]
  if blind_res:
    lines += ["", "## Blind (transfer) IFGSM-20 (%)", "",
              "Crafted with EOT on the oracle, classified by the target (one noise draw).", "",
              "| oracle -> target | target accuracy | target white-box IFGSM-20 |",
              "|---|---|---|"]
    for k, v in blind_res.items():
      tgt = k.split("->")[1]
      lines.append(f"| {k} | {_pct(v)} | {_pct(res.get(tgt, {}).get('attacks', {}).get('ifgsm'))} |")
  n = meta["n_eval"]
  se = 100 * (0.25 / max(n, 1)) ** 0.5
  lines += ["", "## The paper's claims, tested here", "",
            f"A verdict says whether the sign of the measured difference agrees with the paper. "
            f"With {n} test images the standard error of one accuracy near 50 % is "
            f"{se:.1f} points and of a difference of two about {se * 2 ** 0.5:.1f} points "
            "(less when, as here, both are measured on the same images), before seed-to-seed "
            f"variation of the training: differences under about {2 * se * 2 ** 0.5:.0f} "
            "points are not significant.", "",
            "| claim | verdict | evidence |", "|---|---|---|"]
  for c, v, e in claims(res, blind_res, integration):
    lines.append(f"| {c} | **{v}** | {e} |")
  lines += ["", "## Plots", "",
            "- `training_curves.png`: training accuracy on the PGD examples and clean "
            f"validation accuracy per epoch, {curves_note}.",
            "- `acc_vs_eps.png`: IFGSM-20 accuracy against eps (step 2.5 eps / 20, EOT for noisy models).",
            "- `sigma_sweep.png`: accuracy against the noise coefficient a (En1).",
            "", "Raw numbers: `results.json` beside this file; per-run metrics in each run's "
            "`metrics.jsonl`."]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump({"results": res, "blind": blind_res, "integration": integration, "meta": meta,
               "curves": train_curves}, f, indent=2, default=str)
  return path


def carry_over(previous_path: str, res: dict, blind_res: dict, integration: dict | None
               ) -> tuple[dict | None, list[str], dict, dict]:
  """Keep the numbers of runs whose folders are not here from an earlier ``results.json``.

  Runs trained on another machine (their folders gone) keep their evaluation, blind
  results, integration, training curves and training time, so a partial re-run on a
  fresh machine extends the report instead of shrinking it.  ``res`` and ``blind_res``
  are updated in place (what was evaluated now wins).

  Returns:
    ``(integration, carried run names, their training curves, their training seconds)``.
  """
  if not os.path.exists(previous_path):
    return integration, [], {}, {}
  with open(previous_path) as f:
    previous = json.load(f)
  carried = [n for n in RUNS if n not in res and n in previous.get("results", {})]
  for n in carried:
    res[n] = previous["results"][n]
  for k, v in previous.get("blind", {}).items():
    blind_res.setdefault(k, v)
  if integration is None:
    integration = previous.get("integration")
  curves = {n: c for n, c in previous.get("curves", {}).items() if n in carried}
  train_s = {n: t for n, t in previous.get("meta", {}).get("train_s", {}).items()
             if n in carried}
  return integration, carried, curves, train_s


def _finished(workdir: str) -> bool:
  path = os.path.join(workdir, "metrics.jsonl")
  return os.path.exists(path) and any(
      r.get("kind") == "final" for r in jd.training.read_metrics(path))


def _train_seconds(workdir: str) -> float:
  """Time spent in training steps, from the step rate logged in ``metrics.jsonl``.

  Each ``train`` record carries the steps/s of the window since the previous one, so
  the sum is right across resumed runs and leaves out compilation and evaluation.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0.0
  total, last = 0.0, 0
  for r in jd.training.read_metrics(path):
    if r.get("kind") == "train" and r.get("steps_per_second"):
      total += (r["step"] - last) / r["steps_per_second"]
      last = r["step"]
  return total


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--only", default="", help="comma list of run names (default: all)")
  p.add_argument("--quick", action="store_true", help="smoke run with tiny data")
  p.add_argument("--runs", default=None, help="folder of the training runs")
  p.add_argument("--out", default=None, help="report folder")
  p.add_argument("--eval-examples", type=int, default=250)
  p.add_argument("--curve-examples", type=int, default=150)
  p.add_argument("--batch", type=int, default=250)
  p.add_argument("--train-only", action="store_true")
  p.add_argument("--report-only", action="store_true")
  p.add_argument("--reevaluate", action="store_true", help="ignore cached evaluations")
  p.add_argument("--no-carry", action="store_true",
                 help="report only the runs found in --runs (default: runs missing there "
                      "keep their numbers from the report's results.json)")
  args = p.parse_args(argv)
  tag = "enresnet_small_quick" if args.quick else "enresnet_small"
  runs_dir = args.runs or os.path.join(ROOT, "workdirs", tag)
  out_dir = args.out or (os.path.join(runs_dir, "report") if args.quick
                         else os.path.join(HERE, "results", "small"))
  names = [n for n in (args.only.split(",") if args.only else RUNS) if n]
  for n in names:
    if n not in RUNS:
      p.error(f"--only: unknown run {n!r}; expected some of {', '.join(RUNS)}")
  if args.quick:
    args.eval_examples, args.curve_examples = min(args.eval_examples, 100), 50
  t0 = time.time()
  if not args.report_only:
    for n in names:
      wd = os.path.join(runs_dir, n)
      print(f"== {n}: {RUNS[n][0]} ({wd})", flush=True)
      jd.training.train_and_evaluate(config_for(n, args.quick), wd)
  if args.train_only:
    return 0
  test = jd.data.load("fashion_mnist", "test").take(args.eval_examples)
  x, y = np.asarray(test.images), np.asarray(test.labels)
  res, blind_res, integration = {}, {}, None
  if not args.train_only:
    for n in RUNS:
      wd = os.path.join(runs_dir, n)
      if not os.path.exists(os.path.join(wd, "config.json")):
        continue
      if args.report_only and not os.path.exists(os.path.join(wd, "small_eval.json")):
        continue
      if not _finished(wd):
        print(f"== {n}: training not finished, not evaluated", flush=True)
        continue
      print(f"== evaluating {n}", flush=True)
      res[n] = evaluate_run(n, wd, x, y, args)
      state, _ = jd.training.restore(wd, which="best")
      res[n]["params"] = jd.models.count_params(state.params)
    blind_path = os.path.join(runs_dir, "blind.json")
    if os.path.exists(blind_path):
      with open(blind_path) as f:
        blind_res = json.load(f)
    if not args.report_only:
      for o, t in BLIND_PAIRS:
        k = f"{o}->{t}"
        if k in blind_res and not args.reevaluate or o not in res or t not in res:
          continue
        print(f"== blind {k}", flush=True)
        blind_res[k] = blind(Model(os.path.join(runs_dir, o)), Model(os.path.join(runs_dir, t)),
                             x, y, args.batch)
        with open(blind_path, "w") as f:
          json.dump(blind_res, f, indent=2)
    if all(n in res for n in INTEGRATION) and not args.report_only:
      print(f"== integration {'+'.join(INTEGRATION)}", flush=True)
      integration = integrate(runs_dir, INTEGRATION, x, y, args)
    elif os.path.exists(os.path.join(runs_dir, "integration.json")):
      with open(os.path.join(runs_dir, "integration.json")) as f:
        integration = json.load(f)
  carried, previous_curves, previous_train_s = [], {}, {}
  if not args.quick and not args.no_carry:
    integration, carried, previous_curves, previous_train_s = carry_over(
        os.path.join(out_dir, "results.json"), res, blind_res, integration)
  train_s = {n: (previous_train_s.get(n, 0.0) if n in carried
                 else _train_seconds(os.path.join(runs_dir, n))) for n in res}
  meta = {"command": "python experiments/enresnet/small.py" + "".join(" " + a for a in argv),
          "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
          "wall_s": time.time() - t0, "train_s": train_s, "n_eval": int(len(y)),
          "n_curve": int(min(args.curve_examples, len(y))), "carried_over": carried}
  path = write_report(out_dir, runs_dir, res, blind_res, integration, meta, args.quick,
                      previous_curves)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
