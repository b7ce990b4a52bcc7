"""EnResNet at CPU scale: Fashion-MNIST, PGD adversarial training, the paper's evaluation.

A study on the experiment runner (:mod:`jaxdefense.evaluation`)::

  python experiments/enresnet/small.py                   # run or resume every missing cell
  python experiments/enresnet/small.py --cell en2 --seed 0   # one cell (one process)
  python experiments/enresnet/small.py --index 3          # grid entry 3 (job arrays)
  python experiments/enresnet/small.py list               # the grid and each cell's status
  python -m jaxdefense report experiments/enresnet/results/small   # rebuild the report
  python experiments/enresnet/small.py --quick            # smoke run (minutes; own folders)

Base config: ``small_config.py`` beside this file (a pre-activation ResNet-8, PGD-AT at
eps 0.1).  Eleven training cells (:data:`RUNS`) are ``train_and_evaluate`` runs in
``workdirs/enresnet_small/NAME/seedS`` (a half-trained run resumes from its checkpoint);
each is then evaluated on the first 250 test images (best-validation checkpoint):

* white-box FGSM and IFGSM-20 (step eps/4, as the paper's 2/255 at 8/255) on every
  run, and on the ResNet and En1 the paper's C&W (l-inf, tanh space, Adam lr 6e-4,
  c = 10, kappa = 0) and APGD-CE (50 steps) beyond the paper; every gradient through a
  noisy model is averaged over 5 noise draws (EOT);
* IFGSM-20 accuracy against eps on ResNet and En1 (``acc_vs_eps.png``).

Cells that combine trained cells: blind attacks (IFGSM-20 crafted on one model, scored
on another) and the integration of separately trained En1 + En2 (logit average).  The
report (``results/small/report.md``, plots, ``results.json``) tests the paper's claims.
"""

from __future__ import annotations

import os
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
from jaxdefense.evaluation import Cell, CellContext, Results, Study  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BASE = os.path.join(HERE, "small_config.py")

EPS = 0.1  # l-inf radius on Fashion-MNIST pixels in [0, 1] (training and evaluation)

# name -> (description, config overrides).  Every run: pre-activation ResNet-8 (one
# residual block per stage, widths 16/32/64: the paper's ResNet-20 with 1 instead of 3
# blocks per stage), PGD-AT at EPS.  A dict value replaces a whole config group.
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
RUNS_COEF = {"en1_a0.05": 0.05, "en1": 0.1, "en1_a0.4": 0.4, "en1_a0.8": 0.8}
CURVE_RUNS = ("resnet", "en1")
CW_RUNS = ("resnet", "en1")
APGD_RUNS = ("resnet", "en1")
BLIND_PAIRS = (("resnet", "en1"), ("resnet", "en2"), ("en1", "resnet"), ("resnet", "en5"))
INTEGRATION = ("en1", "en2")  # separately trained, logits averaged (Table 5)
# evaluation budget: (test images, accuracy-vs-eps images, batch)
EVAL = {"full": (250, 150, 250), "quick": (100, 50, 250)}


def config_for(overrides: dict, quick: bool = False) -> Any:
  """The resolved config: ``small_config.py`` (``:quick``) with ``overrides`` applied
  (a dotted key sets one field; a dict value replaces the whole group)."""
  c = jd.configs.load_file(BASE, "quick" if quick else None)
  return jd.configs.validate(jd.configs.override(c, overrides))


# ----------------------------------------------------------------- evaluation
class Model:
  """A trained run as the attacks see it: its ModelFn, EOT-wrapped when it draws noise."""

  def __init__(self, workdir: str):
    fn, stochastic, config = jd.evaluation.run_logits_fn(workdir, which="best")
    self.fn, self.stochastic, self.config = fn, stochastic, config
    self.attack_fn = jd.attacks.eot(fn, 5) if stochastic else fn

  def predict(self, x: jax.Array, key: jax.Array) -> jax.Array:
    """Predicted labels with one fresh noise draw (the key is ignored when deterministic)."""
    return jnp.argmax(self.fn(x, key), -1)


def _test_set(quick: bool) -> tuple[np.ndarray, np.ndarray]:
  test = jd.data.load("fashion_mnist", "test").take(EVAL["quick" if quick else "full"][0])
  return np.asarray(test.images), np.asarray(test.labels)


def _batched_accuracy(fn: Callable[[Any, Any, Any], Any], x: np.ndarray, y: np.ndarray,
                      key: jax.Array, batch: int) -> float:
  """Mean of ``fn(x, y, key) == y`` over the library's batch runner."""
  ok = jd.data.run_batches(lambda b, k: fn(b[0], b[1], k) == b[1], (x, y), batch_size=batch,
                           key=key)
  return float(np.mean(ok))


def _curves(workdir: str) -> dict | None:
  """``{"train": [[step, acc], ...], "validation": [[step, acc], ...]}`` from the run's
  ``metrics.jsonl`` (kept in the results so the report needs no run folder)."""
  p = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(p):
    return None
  rows = jd.training.read_metrics(p)
  return {"train": [[r["step"], r["accuracy"]] for r in rows
                    if r.get("kind") == "train" and "accuracy" in r],
          "validation": [[r["step"], r["validation/accuracy"]] for r in rows
                         if "validation/accuracy" in r]}


def train_and_attack(ctx: CellContext) -> dict:
  """A training cell: train (or resume) the run, then the white-box evaluation."""
  name, quick = ctx.cell.name, ctx.cell.info.get("quick", False)
  jd.training.train_and_evaluate(ctx.config, ctx.workdir)
  n_eval, n_curve, batch = EVAL["quick" if quick else "full"]
  x, y = _test_set(quick)
  m = Model(ctx.workdir)
  suite = (f"fgsm,ifgsm:steps=20,step_size={EPS / 4}" + (",cw" if name in CW_RUNS else "")
           + (",apgd-ce:steps=50" if name in APGD_RUNS else ""))
  t = time.time()
  rep = jd.evaluation.evaluate_robustness(
      m.fn, x, y, key=jax.random.key(1), eps=EPS, suite=suite, stochastic=m.stochastic,
      eot_samples=5, batch_size=batch, progress=True,
      meta={"run": name, "dataset": "fashion_mnist"})
  out = {"clean": rep.clean, "attacks": {k.split("(")[0]: v for k, v in rep.attacks.items()},
         "eval_s": time.time() - t, "stochastic": m.stochastic, "n": int(len(y))}
  if name in CURVE_RUNS:
    out["acc_vs_eps"] = jd.evaluation.accuracy_vs_eps(
        m.fn, x[:n_curve], y[:n_curve], key=jax.random.key(2),
        eps_values=(0.0, 0.05, 0.1, 0.15, 0.2), attack="ifgsm:steps=20",
        stochastic=m.stochastic, eot_samples=5, batch_size=batch)
    out["n_curve"] = int(min(n_curve, len(y)))
  state, _ = jd.training.restore(ctx.workdir, which="best")
  out["params"] = jd.models.count_params(state.params)
  out["train_s"] = jd.training.train_seconds(ctx.workdir)
  out["curves"] = _curves(ctx.workdir)
  return out


def blind(ctx: CellContext) -> dict:
  """Accuracy of the target on IFGSM-20 examples crafted (with EOT) on the oracle."""
  oracle = Model(ctx.workdir_of(ctx.cell.info["oracle"]))
  target = Model(ctx.workdir_of(ctx.cell.info["target"]))
  x, y = _test_set(ctx.cell.info.get("quick", False))
  attack = jax.jit(lambda a, b, k: jd.attacks.ifgsm(oracle.attack_fn, a, b, key=k, eps=EPS,
                                                    step_size=EPS / 4, steps=20))

  def correct(xb, yb, k):
    k1, k2 = jax.random.split(k)
    return target.predict(attack(xb, yb, k1), k2)

  return {"accuracy": _batched_accuracy(correct, x, y, jax.random.key(3), 250),
          "n": int(len(y))}


def integrate(ctx: CellContext) -> dict:
  """White-box FGSM / IFGSM-20 (EOT) on the logit average of separately trained runs."""
  names = tuple(ctx.cell.info["members"])
  models = [Model(ctx.workdir_of(n)) for n in names]
  x, y = _test_set(ctx.cell.info.get("quick", False))
  stochastic = any(m.stochastic for m in models)
  combined = jd.models.average_logits([m.fn for m in models])
  rep = jd.evaluation.evaluate_robustness(
      combined, x, y, key=jax.random.key(4), eps=EPS,
      suite=f"fgsm,ifgsm:steps=20,step_size={EPS / 4}", stochastic=stochastic,
      eot_samples=5, batch_size=250, progress=True)
  return {"members": list(names), "clean": rep.clean, "n": int(len(y)),
          "attacks": {k.split("(")[0]: v for k, v in rep.attacks.items()}}


# ----------------------------------------------------------------- report
def _pct(v: float | None) -> str:
  return "–" if v is None else f"{100 * v:.1f}"


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


def _verdict(comparisons: list) -> str:
  """All parts held: held; any part significantly against: did not hold; else
  inconclusive."""
  verdicts = [c.verdict for c in comparisons]
  if "did not hold" in verdicts:
    return "did not hold"
  return "held" if all(v == "held" for v in verdicts) else "inconclusive"


def claims(res: Results) -> list[tuple[str, str, str]]:
  """(claim, verdict, evidence) for the paper's claims that this grid tests.

  Every comparison is a two-sided test at alpha = 0.05 (one seed: the two-proportion
  z-test on the test images; several seeds: Welch's t-test); a claim of several parts
  holds when every part does and fails when any part is significantly against it.
  """
  out = []
  have = lambda *names: all(res.has(n) for n in names)
  acc = lambda n, k: (res.metrics(n).get("clean") if k == "clean"
                      else res.metrics(n).get("attacks", {}).get(k))
  key = lambda k: "clean" if k == "clean" else f"attacks.{k}"
  cmp = lambda a, b, k="ifgsm", rel=">", **kw: res.compare((a, key(k)), (b, key(k)), rel,
                                                            n="n", **kw)
  ev = lambda c: f"{c.evidence()}"

  if have("resnet", "en1"):
    c = [cmp("en1", "resnet", "clean"), cmp("en1", "resnet")]
    out.append(("Noise injection (En1) improves both natural and IFGSM-20 robust accuracy "
                "over the ResNet (Table 1)", _verdict(c),
                f"natural: {ev(c[0])}; IFGSM-20: {ev(c[1])}"))
  if have("en1", "en2", "en5"):
    c = [cmp("en2", "en1"), cmp("en5", "en2")]
    out.append(("More ensemble members (En1 < En2 < En5) give higher robust accuracy (Table 1)",
                _verdict(c), "IFGSM-20 " + " / ".join(_pct(acc(n, "ifgsm")) for n in
                                                      ("en1", "en2", "en5")) +
                f" %; En2 vs En1: {ev(c[0])}; En5 vs En2: {ev(c[1])}"))
  if have("ens2", "en2"):
    c = cmp("en2", "ens2")
    out.append(("A plain ensemble of 2 ResNets without noise is clearly less robust than En2 "
                "(section 3.3)", c.verdict,
                f"En2 minus plain ensemble: IFGSM-20 {ev(c)}; natural "
                f"{(acc('en2', 'clean') - acc('ens2', 'clean')) * 100:+.1f} pt"))
  if have("resnet", "swe2", "en1"):
    c = [cmp("swe2", "resnet"), cmp("swe2", "en1")]
    out.append(("Shared-weights ensembles (2 x En1) beat the ResNet, and averaging noise draws "
                "adds a little over En1 (Table 7)", _verdict(c),
                f"IFGSM-20, SWE minus ResNet: {ev(c[0])}; SWE minus En1: {ev(c[1])}"))
  sig = [n for n in SIGMA_RUNS if res.has(n)]
  if "en1_a0.8" in sig and len(sig) >= 3:
    flat = [n for n in sig if n != "en1_a0.8"]
    pairs = [cmp(a, b) for i, a in enumerate(flat) for b in flat[i + 1:]]
    drop = cmp("en1_a0.8", "en1" if "en1" in flat else flat[0], rel="<")
    if any(p.verdict != "inconclusive" for p in pairs) or drop.verdict == "did not hold":
      v = "did not hold"
    else:
      v = drop.verdict  # flat: no significant difference among a <= 0.4; drop: tested
    out.append(("Robust accuracy is flat for a up to 0.4 and drops at a = 0.8 "
                "(Table 6: 0.05 / 0.1 / 0.4 / 0.8)", v,
                "IFGSM-20 " + ", ".join(f"a={RUNS_COEF[n]}: {_pct(acc(n, 'ifgsm'))} %"
                                        for n in sig) +
                f"; drop a=0.8 vs a=0.1: {ev(drop)}; smallest p among a <= 0.4: "
                f"{min(p.p_value for p in pairs):.3g}"))
  if have("nat_resnet", "nat_en1"):
    r = [acc(n, "ifgsm") for n in ("nat_resnet", "nat_en1")]
    f = [acc(n, "fgsm") for n in ("nat_resnet", "nat_en1")]
    c = cmp("nat_en1", "nat_resnet", "fgsm")
    v = "did not hold" if max(r) >= 0.05 else c.verdict
    out.append(("Naturally trained EnResNets fall to near 0 % under IFGSM-20 (no gradient "
                "masking), yet resist FGSM better than the naturally trained ResNet (sec. 3.3)",
                v, f"IFGSM-20 {_pct(r[0])} / {_pct(r[1])} % (both under 5 %: "
                f"{'yes' if max(r) < 0.05 else 'no'}), FGSM {_pct(f[0])} / {_pct(f[1])} % "
                f"(ResNet / En1): {ev(c)}"))
  cell = "blind_resnet_en2"
  if res.has(cell) and have("en2", "resnet"):
    c = res.compare((cell, "accuracy"), ("en2", "attacks.ifgsm"), ">", n="n")
    out.append(("Blind attacks crafted on the ResNet are weaker on En2 than white-box ones "
                "(Table 2)", c.verdict,
                f"En2 on ResNet-crafted IFGSM-20 {_pct(res.metrics(cell)['accuracy'])} % vs "
                f"white-box {_pct(acc('en2', 'ifgsm'))} %: {ev(c)}"))
  cell = "integration_" + "_".join(INTEGRATION)
  if res.has(cell) and have(*INTEGRATION):
    best = max(INTEGRATION, key=lambda n: acc(n, "ifgsm"))
    c = res.compare((cell, "attacks.ifgsm"), (best, "attacks.ifgsm"), ">", n="n")
    out.append(("Integrating separately trained EnResNets (logit average) is more robust "
                "than its best member (Table 5)", c.verdict,
                f"IFGSM-20 {_pct(res.metrics(cell)['attacks']['ifgsm'])} % vs best member "
                f"{_pct(acc(best, 'ifgsm'))} %: {ev(c)}"))
  if have("en1") and acc("en1", "apgd-ce") is not None:
    d = acc("en1", "ifgsm") - acc("en1", "apgd-ce")
    c = res.compare(("en1", "attacks.apgd-ce"), ("en1", "attacks.ifgsm"), ">", n="n",
                    margin=-0.02)
    out.append(("(beyond the paper) APGD-CE with EOT is not much stronger than IFGSM-20 on "
                "En1 (less than 2 points), i.e. IFGSM-20 was not overestimating robustness",
                c.verdict, f"IFGSM-20 minus APGD-CE: {d * 100:+.1f} pt; APGD-CE > IFGSM-20 "
                f"- 2 pt: {ev(c)}"))
  return out


def _machine(m: dict) -> str:
  """``"x86_64, 2 CPU cores; jax 0.10.2"`` from a record's machine."""
  text = m.get("summary") or f"{m.get('machine')}, {m.get('cpu_count')} CPU cores"
  return text + (f"; jax {m['jax']}" if m.get("jax") else "")


def report(res: Results, out_dir: str, quick: bool = False) -> list[str]:
  """The study's report sections (markdown lines); writes the plots into ``out_dir``.

  ``training_curves.png`` is redrawn only when the curves of every reported run are in
  the results; otherwise an existing plot is kept and the report says which it lacks.
  """
  names = [n for n in RUNS if res.has(n)]
  m = {n: res.metrics(n) for n in names}
  curves = {n: m[n]["curves"] for n in names if m[n].get("curves")}
  curves_png = os.path.join(out_dir, "training_curves.png")
  missing = [n for n in names if n not in curves]
  if not missing or not os.path.exists(curves_png):
    plot_training(curves, curves_png)
    curves_note = "every run" if not missing else (
        "every run but " + ", ".join(f"`{n}`" for n in missing))
  else:
    curves_note = ("as drawn by an earlier invocation: the results hold no curves of "
                   + ", ".join(f"`{n}`" for n in missing) + ", so the plot was kept, "
                   "which may lack the runs added since")
  acc_curves = {RUNS[n][0]: [tuple(p) for p in m[n]["acc_vs_eps"]]
                for n in names if m[n].get("acc_vs_eps")}
  if acc_curves:
    jd.evaluation.plot_accuracy_vs_eps(acc_curves, os.path.join(out_dir, "acc_vs_eps.png"),
                                       title="IFGSM-20 (EOT-5) accuracy vs eps, F-MNIST")
  plot_sigma(m, os.path.join(out_dir, "sigma_sweep.png"))
  cfg = config_for({}, quick)
  n_eval = max((m[n].get("n", 0) for n in names), default=0)
  n_curve = max((m[n].get("n_curve", 0) for n in names), default=0) or EVAL[
      "quick" if quick else "full"][1]
  records = [r for r in res.records if r.get("status") == "done"]
  machines = sorted({_machine(r.get("machine") or {}) for r in records})
  train_s = {n: m[n].get("train_s", 0.0) for n in names}
  lines = ["**QUICK SMOKE RUN: numbers meaningless.**", ""] if quick else []
  lines += [
      f"Machine(s): {'; '.join(machines)}. Time in training steps, all runs: "
      f"{sum(train_s.values()) / 60:.1f} min (the machine was shared with test "
      f"and benchmark jobs part of the time, so per-run times are noisy).",
      "",
      "## Setup",
      "",
      f"- Data: Fashion-MNIST, the first {cfg.train_size} training images after a "
      f"{cfg.validation_size}-image validation hold-out (best-validation checkpoint), "
      f"random crop (pad {cfg.augment.pad}) and flip; evaluation on the first "
      f"{n_eval} test images (accuracy-vs-eps curves: the first {n_curve}).",
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
      f"- Seeds per configuration: {', '.join(sorted({str(len(res.seeds(n))) for n in names}))}"
      " (the paper's own Table 6 shows a spread of +-0.3 to +-0.9 points over 5 seeds); "
      "with one seed the errors below are over test images only, not over training runs.",
      "",
      "## White-box accuracy (%)",
      "",
      f"Mean ± standard error (one seed: binomial over the {n_eval} test images).",
      "",
  ]
  est = lambda n, k: res.estimate(n, "clean" if k == "clean" else f"attacks.{k}", n="n")
  rows = [[f"`{n}`", RUNS[n][0]] + [est(n, k).format() for k in
                                    ("clean", "fgsm", "ifgsm", "cw", "apgd-ce")]
          + [f"{m[n].get('params', 0):,}", f"{train_s[n] / 60:.1f}"] for n in names]
  lines += jd.evaluation.markdown_table(
      ["run", "model", "natural", "FGSM", "IFGSM-20", "C&W", "APGD-CE", "params",
       "train min"], rows)
  cell = "integration_" + "_".join(INTEGRATION)
  if res.has(cell):
    parts = " + ".join(f"`{n}`" for n in res.metrics(cell)["members"])
    lines += ["", "## Integration of separately trained models (Table 5 analogue)", "",
              f"Logits of {parts} averaged (each trained on its own); white-box with EOT.", ""]
    lines += jd.evaluation.markdown_table(
        ["model", "natural", "FGSM", "IFGSM-20"],
        [[parts] + [est(cell, k).format() for k in ("clean", "fgsm", "ifgsm")]])
  blind_cells = [f"blind_{o}_{t}" for o, t in BLIND_PAIRS if res.has(f"blind_{o}_{t}")]
  if blind_cells:
    lines += ["", "## Blind (transfer) IFGSM-20 (%)", "",
              "Crafted with EOT on the oracle, classified by the target (one noise draw).", ""]
    rows = []
    for c in blind_cells:
      o, t = res.study.get("cells", {}).get(c, {}).get("needs") or c.split("_")[1:3]
      rows.append([f"{o}->{t}", res.estimate(c, "accuracy", n="n").format(),
                   est(t, "ifgsm").format() if res.has(t) else None])
    lines += jd.evaluation.markdown_table(
        ["oracle -> target", "target accuracy", "target white-box IFGSM-20"], rows)
  lines += ["", "## The paper's claims, tested here", "",
            "Each verdict comes from a two-sided test at alpha = 0.05 (see Statistics "
            "below); a claim of several parts holds when every part holds and fails when "
            "any part is significantly against it.  With "
            f"{n_eval} test images the standard error of one accuracy near 50 % is "
            f"{100 * (0.25 / max(n_eval, 1)) ** 0.5:.1f} points, so most differences here "
            "are inside the noise.", ""]
  lines += jd.evaluation.markdown_table(
      ["claim", "verdict", "evidence"], [[c, f"**{v}**", e] for c, v, e in claims(res)])
  lines += ["", "## Plots", "",
            "- `training_curves.png`: training accuracy on the PGD examples and clean "
            f"validation accuracy per epoch, {curves_note}.",
            "- `acc_vs_eps.png`: IFGSM-20 accuracy against eps (step 2.5 eps / 20, EOT for "
            "noisy models).",
            "- `sigma_sweep.png`: accuracy against the noise coefficient a (En1).",
            "", "Raw numbers: `results.json` beside this file (per cell: metrics, config, "
            "commit, command, machine); per-run metrics in each run's `metrics.jsonl`."]
  return lines


def make_study(quick: bool = False) -> Study:
  """The study: the eleven training cells, the blind-attack cells and the integration.

  ``quick``: the smoke-scale study (``small_config.py:quick``, 100 test images), with
  its own run and results folders.
  """
  info = {"quick": quick}
  cells = [Cell(n, o, description=d, info=info) for n, (d, o) in RUNS.items()]
  cells += [Cell(f"blind_{o}_{t}", needs=(o, t), run=blind,
                 description=f"IFGSM-20 crafted on {o}, scored on {t}",
                 info={**info, "oracle": o, "target": t}) for o, t in BLIND_PAIRS]
  cells.append(Cell("integration_" + "_".join(INTEGRATION), needs=INTEGRATION, run=integrate,
                    description=" + ".join(INTEGRATION) + ", logits averaged",
                    info={**info, "members": list(INTEGRATION)}))
  tag = "enresnet_small_quick" if quick else "enresnet_small"
  base = lambda overrides: config_for(overrides, quick)
  base.__qualname__ = ("experiments/enresnet/small_config.py" + (":quick" if quick else "")
                       + " + overrides (a dict value replaces a group)")
  return Study.for_script(
      tag, base, cells, seeds=(0,), run=train_and_attack,
      report=lambda res, out: report(res, out, quick),
      title="EnResNet, small scale: Fashion-MNIST, PGD adversarial training",
      spec=__file__, results="results/small", quick=quick, root=ROOT)


STUDY = make_study(False)
QUICK_STUDY = lambda: make_study(True)  # noqa: E731  (built on demand)


if __name__ == "__main__":
  sys.exit(jd.evaluation.study_main(make_study))   # --quick: make_study(True)
