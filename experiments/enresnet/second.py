"""EnResNet, second pass (issue 15): the paper's claims as stated, with seeds and tests.

A study on the experiment runner (:mod:`jaxdefense.evaluation`), on the base config of
the small study (``small_config.py``: Fashion-MNIST, pre-activation ResNet-8, PGD-AT at
eps 0.1)::

  python experiments/enresnet/second.py                  # run or resume every missing cell
  python experiments/enresnet/second.py --cell en2 --seed 1   # one cell (one process)
  python experiments/enresnet/second.py --index 7         # grid entry 7 (job arrays)
  python experiments/enresnet/second.py list              # the grid and each cell's status
  python -m jaxdefense report experiments/enresnet/results/second   # rebuild the report
  python experiments/enresnet/second.py --quick           # smoke run (own folders)

What it changes against ``small.py`` (whose report it supersedes; see the README):

* every training cell runs with 3 seeds and is evaluated on the first 2,000 test images
  (natural, FGSM, IFGSM-20 with EOT over 5 draws for noisy models); verdicts are Welch
  t-tests over seeds, two-sided at alpha 0.05;
* the noise sweep is on En2, the paper's Table 6 model (a = 0.05, 0.1, 0.4, 0.8);
* blind attacks in both directions (ResNet -> En_n and En_n -> ResNet, the same
  IFGSM-20), the comparison the paper's Table 2 makes;
* the ensemble-size confound: En2 / En5 with the loss summed over members (learning rate
  x n, weight decay / n, which is exactly the summed loss under SGD with L2) and with a
  schedule twice as long;
* Feynman–Kac averaging on the trained En1 / En2 / En5: 1, 5, 20, 100 noise draws,
  logits against probabilities averaged, natural and IFGSM-20 (EOT) accuracy;
* the paper's C&W (50 Adam steps at lr 6e-4, which moves a pixel by at most about 0.015
  and so cannot reach eps 0.1) beside a C&W that can (100 steps at lr 0.01).
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxdefense as jd  # noqa: E402
from jaxdefense.evaluation import Cell, CellContext, Results, Study  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import small  # noqa: E402  (the small study's config, model loader and plots)

EPS = small.EPS
SEEDS = (0, 1, 2)
# scale -> (test images, batch, Feynman–Kac draws)
EVAL = {"full": (2000, 250, (1, 5, 20, 100)), "quick": (64, 64, (1, 2, 4))}
PAPER_CW = "cw"                              # 50 Adam steps, lr 6e-4, c 10
REACH_CW = "cw:steps=100,lr=0.01"            # moves a pixel up to ~0.5 in 100 steps
CW_RUNS = ("resnet", "en1")

_EM = {"model.step.name": "euler_maruyama"}
_BASE_LR, _BASE_WD = 0.1, 5e-4

# name -> (description, overrides)
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet": ("ResNet (no noise)", {}),
    "en1": ("En1 ResNet (a = 0.1)", dict(_EM)),
    "en2": ("En2 ResNet (a = 0.1)", {**_EM, "ensemble.size": 2}),
    "en5": ("En5 ResNet (a = 0.1)", {**_EM, "ensemble.size": 5}),
    "swe2": ("2 x En1, shared weights (SWE)",
             {**_EM, "ensemble.size": 2, "ensemble.shared": True}),
}
SIGMAS = {"en2_a0.05": 0.05, "en2": 0.1, "en2_a0.4": 0.4, "en2_a0.8": 0.8}
for _name, _a in SIGMAS.items():
  if _name != "en2":
    RUNS[_name] = (f"En2 ResNet, a = {_a:g}",
                   {**_EM, "ensemble.size": 2, "model.step.coef": _a})
for _n in (2, 5):
  RUNS[f"en{_n}_sum"] = (f"En{_n}, loss summed over members (lr x {_n}, wd / {_n})",
                         {**_EM, "ensemble.size": _n,
                          "optimizer.learning_rate": _BASE_LR * _n,
                          "optimizer.weight_decay": _BASE_WD / _n})
  RUNS[f"en{_n}_long"] = (f"En{_n}, schedule twice as long (12 epochs)",
                          {**_EM, "ensemble.size": _n, "epochs": 12,
                           "schedule.milestones": (8, 10)})
BLIND = [(o, t) for n in ("en1", "en2", "en5") for o, t in (("resnet", n), (n, "resnet"))]
FK_RUNS = ("en1", "en2", "en5")


def config_for(overrides: dict, quick: bool = False) -> Any:
  """``small_config.py`` (``:quick``) with ``overrides`` (quick: the schedule shrunk)."""
  overrides = dict(overrides)
  if quick and "epochs" in overrides:
    overrides.update({"epochs": 3, "schedule.milestones": (2,)})
  return small.config_for(overrides, quick)


def _scale(ctx_or_info: Any) -> str:
  info = ctx_or_info.cell.info if hasattr(ctx_or_info, "cell") else ctx_or_info
  return "quick" if info.get("quick") else "full"


def _test_set(scale: str) -> tuple[np.ndarray, np.ndarray]:
  test = jd.data.load("fashion_mnist", "test").take(EVAL[scale][0])
  return np.asarray(test.images), np.asarray(test.labels)


def _attack_names(rep_attacks: dict) -> dict:
  """``{"fgsm": .., "ifgsm": .., "cw": .., "cw_reach": ..}`` from a report's keys."""
  out = {}
  for k, v in rep_attacks.items():
    name = k.split("(")[0]
    if name == "cw" and "lr=0.01" in k.replace(" ", ""):
      name = "cw_reach"
    out[name] = v
  return out


# ----------------------------------------------------------------- cells
def train_and_attack(ctx: CellContext) -> dict:
  """Train (or resume), then natural / FGSM / IFGSM-20 (and C&W on ResNet and En1)."""
  name, scale = ctx.cell.name, _scale(ctx)
  jd.training.train_and_evaluate(ctx.config, ctx.workdir)
  n, batch, _ = EVAL[scale]
  x, y = _test_set(scale)
  m = small.Model(ctx.workdir)
  suite = f"fgsm,ifgsm:steps=20,step_size={EPS / 4}"
  if name in CW_RUNS:
    suite += f",{PAPER_CW},{REACH_CW}"
  t = time.time()
  rep = jd.evaluation.evaluate_robustness(
      m.fn, x, y, key=jax.random.key(1), eps=EPS, suite=suite, stochastic=m.stochastic,
      eot_samples=5, batch_size=batch, progress=True,
      meta={"run": name, "dataset": "fashion_mnist"})
  state, _ = jd.training.restore(ctx.workdir, which="best")
  curves = small._curves(ctx.workdir)
  return {"clean": rep.clean, "attacks": _attack_names(rep.attacks), "n": int(len(y)),
          "eval_s": time.time() - t, "stochastic": m.stochastic,
          "params": jd.models.count_params(state.params),
          "train_s": jd.training.train_seconds(ctx.workdir), "curves": curves,
          "final_train_accuracy": (curves["train"][-1][1] if curves and curves["train"]
                                   else None)}


def blind(ctx: CellContext) -> dict:
  """Accuracy of the target on IFGSM-20 images crafted (EOT-5) on the oracle."""
  info = ctx.cell.info
  oracle = small.Model(ctx.workdir_of(info["oracle"]))
  target = small.Model(ctx.workdir_of(info["target"]))
  scale = _scale(ctx)
  x, y = _test_set(scale)
  attack = jax.jit(lambda a, b, k: jd.attacks.ifgsm(oracle.attack_fn, a, b, key=k, eps=EPS,
                                                    step_size=EPS / 4, steps=20))

  def correct(xb, yb, k):
    k1, k2 = jax.random.split(k)
    return target.predict(attack(xb, yb, k1), k2) == yb

  ok = jd.data.run_batches(lambda b, k: correct(b[0], b[1], k), (x, y),
                           batch_size=EVAL[scale][1], key=jax.random.key(3), progress=True,
                           desc=f"blind {info['oracle']}->{info['target']}")
  return {"accuracy": float(np.mean(ok)), "n": int(len(y))}


def feynman_kac(ctx: CellContext) -> dict:
  """Monte-Carlo averages over noise draws of a trained noisy model.

  IFGSM-20 images are crafted once (EOT-5 through the logit-averaging model, as the
  white-box rows); each image is then classified from ``K`` fresh noise draws, with the
  draws (and, for En_n, the members) combined by averaging logits or probabilities.
  The ``K`` draws are nested (the first ``K`` of the largest ``K``).
  """
  run = ctx.cell.info["run"]
  scale = _scale(ctx)
  n, batch, draws = EVAL[scale]
  x, y = _test_set(scale)
  base = small.Model(ctx.workdir_of(run))
  kmax = max(draws)
  fns = {"logits": base.fn}
  if isinstance(base.fn.module, jd.models.Ensemble):
    fns["probs"] = base.fn.replace(module=base.fn.module.clone(average="probs"))
  else:
    fns["probs"] = base.fn   # one member: only the average over draws differs
  attack = jax.jit(lambda a, b, k: jd.attacks.ifgsm(base.attack_fn, a, b, key=k, eps=EPS,
                                                    step_size=EPS / 4, steps=20))

  def per_image(b, k):
    xb, yb = b
    ka, kd = jax.random.split(k)
    xs = {"clean": xb, "robust": attack(xb, yb, ka)}
    keys = jax.random.split(kd, kmax)
    out = {}
    for mode, fn in fns.items():
      for which, xi in xs.items():
        logits = jax.lax.map(lambda key: fn(xi, key), keys)            # [K, B, C]
        if mode == "logits":
          run_mean = jnp.cumsum(logits, axis=0)                       # prefix sums
        else:
          run_mean = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=0)
        for kk in draws:
          out[f"{mode}.k{kk}.{which}"] = jnp.argmax(run_mean[kk - 1], -1) == yb
    return out

  ok = jd.data.run_batches(per_image, (x, y), batch_size=batch, key=jax.random.key(5),
                           progress=True, desc=f"feynman-kac {run}")
  res: dict[str, Any] = {"n": int(len(y)), "draws": list(draws)}
  for path, flags in ok.items():
    mode, k, which = path.split(".")
    res.setdefault(mode, {}).setdefault(k, {})[which] = float(np.mean(flags))
  return res


# ----------------------------------------------------------------- report
def _verdict(comparisons: list) -> str:
  verdicts = [c.verdict for c in comparisons]
  if "did not hold" in verdicts:
    return "did not hold"
  return "held" if verdicts and all(v == "held" for v in verdicts) else "inconclusive"


def claims(res: Results) -> list[tuple[str, str, str]]:
  """(claim quoted from the paper, verdict, evidence); Welch's t-test over seeds
  (two-sided, alpha 0.05; one seed: two-proportion z-test on the test images)."""
  out = []
  have = lambda *names: all(res.has(n) for n in names)
  key = lambda k: "clean" if k == "clean" else f"attacks.{k}"
  cmp = lambda a, b, k="ifgsm", rel=">": res.compare((a, key(k)), (b, key(k)), rel, n="n")
  if have("resnet", "en1"):
    c = [cmp("en1", "resnet", "clean"), cmp("en1", "resnet")]
    out.append(("\"Simply injecting noise to each residual mapping of ResNet20 can increase "
                "Anat by ~2% and Arob by ~3% under the IFGSM20 attack\" (Table 1): En1 "
                "above the ResNet on both", _verdict(c),
                f"natural: {c[0].evidence()}; IFGSM-20: {c[1].evidence()}"))
  ens = [n for n in ("en2", "en5") if res.has(n)]
  if res.has("resnet") and ens:
    c = [cmp(n, "resnet", k) for n in ens for k in ("clean", "ifgsm")]
    out.append(("\"the robustly trained EnResNets are more accurate, on both clean and "
                "adversarial data, than robustly trained ResNets\" (Table 1): "
                + " and ".join(ens) + " above the ResNet on natural and IFGSM-20 accuracy",
                _verdict(c), "; ".join(f"{n} {k}: {x.evidence()}" for (n, k), x in zip(
                    [(n, k) for n in ens for k in ("natural", "IFGSM-20")], c))))
  pairs = [n for n in ("en1", "en2", "en5")
           if res.has(f"blind_resnet_{n}") and res.has(f"blind_{n}_resnet")]
  if pairs:
    c = [res.compare((f"blind_resnet_{n}", "accuracy"), (f"blind_{n}_resnet", "accuracy"),
                     ">", n="n") for n in pairs]
    out.append(("\"EnResNets are always more robust than the base ResNets under different "
                "blind attacks\" (Table 2: the EnResNet classifying images crafted on the "
                "ResNet against the ResNet classifying images crafted on the EnResNet): "
                "IFGSM-20 both ways", _verdict(c),
                "; ".join(f"{n}: {x.evidence()}" for n, x in zip(pairs, c))))
  if have("swe2", "resnet"):
    c = [cmp("swe2", "resnet", "clean"), cmp("swe2", "resnet")]
    out.append(("\"the share weights ensemble (SWE) also improves both natural and robust "
                "accuracies\" (Table 7): 2 x En1 above the ResNet", _verdict(c),
                f"natural: {c[0].evidence()}; IFGSM-20: {c[1].evidence()}"))
  sig = [n for n in SIGMAS if res.has(n)]
  if "en2_a0.8" in sig and "en2" in sig and len(sig) >= 3:
    flat = [n for n in sig if n != "en2_a0.8"]
    # two-sided tests: a pair "differs" when significant in either direction
    within = [cmp(a, b) for i, a in enumerate(flat) for b in flat[i + 1:]]
    drop = cmp("en2_a0.8", "en2", rel="<")
    differ = [w for w in within if w.verdict != "inconclusive"]
    v = "did not hold" if differ or drop.verdict == "did not hold" else drop.verdict
    out.append(("Table 6 (En2, five runs): IFGSM-20 accuracy 50.05 / 50.06 / 50.51 / 43.51 % "
                "at sigma 0.05 / 0.1 / 0.4 / 0.8, \"0.1 gives a good trade-off between "
                "accuracy and variance\": flat up to 0.4 (no pair differs) and lower at 0.8",
                v, f"drop at 0.8 vs 0.1: {drop.evidence()}; pairs up to 0.4 that differ: "
                f"{len(differ)} of {len(within)} (smallest p "
                f"{min((w.p_value for w in within), default=float('nan')):.3g})"))
  return out


def confound(res: Results) -> list[str]:
  """Which explanation of "robust accuracy falls with ensemble size" the data support."""
  lines = []
  for n in (2, 5):
    base, summed, long_ = f"en{n}", f"en{n}_sum", f"en{n}_long"
    if not res.has(base):
      continue
    parts = []
    for alt, what in ((summed, "loss summed over members"), (long_, "twice as long")):
      if res.has(alt):
        c = res.compare((alt, "attacks.ifgsm"), (base, "attacks.ifgsm"), ">", n="n")
        parts.append(f"{what}: {alt} above {base}: **{c.verdict}** ({c.evidence()})")
        if res.has("en1"):
          d = res.compare((alt, "attacks.ifgsm"), ("en1", "attacks.ifgsm"), "<", n="n")
          parts.append(f"{alt} still below En1: **{d.verdict}** ({d.evidence()})")
    if res.has("en1"):
      d = res.compare((base, "attacks.ifgsm"), ("en1", "attacks.ifgsm"), "<", n="n")
      parts.insert(0, f"{base} below En1 (the effect to explain): **{d.verdict}** "
                   f"({d.evidence()})")
    lines.append(f"- En{n}: " + "; ".join(parts))
  return lines


def report(res: Results, out_dir: str, quick: bool = False) -> list[str]:
  """The report's markdown lines (and ``training_curves.png`` in ``out_dir``)."""
  names = [n for n in RUNS if res.has(n)]
  m = {n: res.metrics(n) for n in names}
  curves = {n: m[n]["curves"] for n in names if m[n].get("curves")}
  if curves:
    small.plot_training(curves, os.path.join(out_dir, "training_curves.png"))
  est = lambda n, k: res.estimate(n, "clean" if k == "clean" else f"attacks.{k}", n="n")
  cfg = config_for({}, quick)
  n_eval = max((m[x].get("n", 0) for x in names), default=0)
  records = [r for r in res.records if r.get("status") == "done"]
  machines = sorted({small._machine(r.get("machine") or {}) for r in records})
  train_min = sum(sum(res.values(x, "train_s")) for x in names) / 60
  lines = ["**QUICK SMOKE RUN: numbers meaningless.**", ""] if quick else []
  lines += [
      f"Machine(s): {'; '.join(machines)}. Training time, all runs and seeds: "
      f"{train_min:.0f} min.", "",
      "## Setup", "",
      f"- As the small study (`small_config.py`): Fashion-MNIST, {cfg.train_size} training "
      f"images, {cfg.validation_size}-image validation hold-out (best-validation checkpoint), "
      f"pre-activation ResNet-8, PGD-AT at eps {EPS} ({cfg.objective.steps} steps), SGD "
      f"{cfg.optimizer.learning_rate} / 0.9 / {cfg.optimizer.weight_decay}, {cfg.epochs} "
      f"epochs (milestones {tuple(cfg.schedule.milestones)}). The paper: CIFAR-10, "
      "ResNet-20 and deeper, 200 epochs.",
      f"- Evaluation: the first {n_eval} test images at eps {EPS}; noisy models attacked with "
      "EOT over 5 draws and classified with one fresh draw. Seeds: "
      + ", ".join(f"{n} {len(res.seeds(n))}" for n in names) + ".",
      "- Numbers: mean ± standard error over seeds (one seed: binomial over images). "
      "Verdicts: Welch's t-test over seeds, two-sided, alpha 0.05; a claim of several "
      "parts holds when every part holds and fails when any part is significantly "
      "against it.", "",
      "## White-box accuracy (%)", ""]
  rows = [[f"`{n}`", RUNS[n][0]] + [est(n, k).format() for k in ("clean", "fgsm", "ifgsm")]
          + [str(len(res.seeds(n)))] for n in names]
  lines += jd.evaluation.markdown_table(["run", "model", "natural", "FGSM", "IFGSM-20",
                                         "seeds"], rows)
  cw = [n for n in CW_RUNS if n in names]
  if cw:
    lines += ["", "## C&W (l-inf, tanh form, c = 10)", "",
              "The paper's budget (50 Adam steps at lr 6e-4) moves a pixel by at most "
              "about 0.5 x 6e-4 x 50 = 0.015 in image space, so it cannot reach eps = "
              f"{EPS}: its column measures a weak attack, not robustness at eps. The "
              "second column gives the attack a budget that can reach eps (100 steps at "
              "lr 0.01).", ""]
    lines += jd.evaluation.markdown_table(
        ["run", "C&W, paper budget", "C&W, 100 steps lr 0.01", "IFGSM-20"],
        [[f"`{n}`", est(n, "cw").format(), est(n, "cw_reach").format(),
          est(n, "ifgsm").format()] for n in cw])
  sig = [n for n in SIGMAS if n in names]
  if sig:
    lines += ["", "## Noise coefficient on En2 (Table 6)", ""]
    lines += jd.evaluation.markdown_table(
        ["a", "natural", "IFGSM-20", "SD of IFGSM-20 over seeds", "seeds"],
        [[f"{SIGMAS[n]:g}", est(n, "clean").format(), est(n, "ifgsm").format(),
          f"{100 * float(np.std(res.values(n, 'attacks.ifgsm'), ddof=1)):.2f}"
          if len(res.seeds(n)) > 1 else "–", str(len(res.seeds(n)))] for n in sig])
  conf = confound(res)
  if conf:
    lines += ["", "## The ensemble-size confound", "",
              "Hypothesis: averaging logits divides each member's gradient by n while the "
              "weight decay is not divided, so with a fixed learning rate larger ensembles "
              "train more slowly. If so, summing the loss over members (lr x n, wd / n) or "
              "training longer lifts En2 / En5; if not, the drop stays.", ""]
    rows = [[f"`{n}`", RUNS[n][0], est(n, "clean").format(), est(n, "ifgsm").format(),
             res.estimate(n, "final_train_accuracy").format()
             if res.values(n, "final_train_accuracy") else "–"]
            for n in ("en1", "en2", "en2_sum", "en2_long", "en5", "en5_sum", "en5_long")
            if n in names]
    lines += jd.evaluation.markdown_table(
        ["run", "model", "natural", "IFGSM-20", "last training accuracy (PGD examples)"],
        rows)
    lines += [""] + conf
  blind_cells = [(o, t) for o, t in BLIND if res.has(f"blind_{o}_{t}")]
  if blind_cells:
    lines += ["", "## Blind (transfer) IFGSM-20, both directions (%)", ""]
    lines += jd.evaluation.markdown_table(
        ["oracle -> target", "target accuracy", "target white-box IFGSM-20"],
        [[f"{o} -> {t}", res.estimate(f"blind_{o}_{t}", "accuracy", n="n").format(),
          est(t, "ifgsm").format() if res.has(t) else "–"] for o, t in blind_cells])
  fk = [r for r in FK_RUNS if res.has(f"fk_{r}")]
  if fk:
    draws = res.metrics(f"fk_{fk[0]}").get("draws", [])
    lines += ["", "## Feynman–Kac averaging over noise draws (%)", "",
              "Each image classified from K fresh noise draws, combined by averaging logits "
              "(the authors' code) or probabilities (the paper's u(x, 0) = E[f(x(1))]); "
              "robust: the same IFGSM-20 (EOT-5) images for every K.", ""]
    rows = []
    for r in fk:
      for mode in ("logits", "probs"):
        rows.append([f"`{r}`", mode] + [
            res.estimate(f"fk_{r}", f"{mode}.k{k}.{w}", n="n").format()
            for w in ("clean", "robust") for k in draws])
    lines += jd.evaluation.markdown_table(
        ["run", "average"] + [f"{w} K={k}" for w in ("natural", "robust") for k in draws],
        rows)
    kmax = max(draws) if draws else None
    if kmax:
      lines += [""]
      for r in fk:
        for w in ("clean", "robust"):
          c = res.compare((f"fk_{r}", f"probs.k{kmax}.{w}"), (f"fk_{r}", f"logits.k{kmax}.{w}"),
                          ">", n="n")
          lines.append(f"- `{r}`, {w}, K={kmax}: probabilities vs logits: {c.evidence()}")
  lines += ["", "## The paper's claims, tested here", ""]
  lines += jd.evaluation.markdown_table(
      ["claim (quoted)", "verdict", "evidence"], [[c, f"**{v}**", e] for c, v, e in claims(res)])
  lines += ["", "Raw numbers: `results.json` beside this file (per cell and seed: metrics, "
            "config, commit, command, machine)."]
  return lines


def make_study(quick: bool = False) -> Study:
  """Training cells x 3 seeds, blind cells and Feynman–Kac cells per seed."""
  info = {"quick": quick}
  seeds = (0,) if quick else SEEDS
  cells = [Cell(n, o, description=d, info=info) for n, (d, o) in RUNS.items()]
  cells += [Cell(f"blind_{o}_{t}", needs=(o, t), run=blind,
                 description=f"IFGSM-20 crafted on {o}, classified by {t}",
                 info={**info, "oracle": o, "target": t}) for o, t in BLIND]
  cells += [Cell(f"fk_{r}", needs=(r,), run=feynman_kac,
                 description=f"{r}: averages over noise draws", info={**info, "run": r})
            for r in FK_RUNS]
  tag = "enresnet_second_quick" if quick else "enresnet_second"
  base = lambda overrides: config_for(overrides, quick)
  base.__qualname__ = ("experiments/enresnet/small_config.py" + (":quick" if quick else "")
                       + " + overrides (a dict value replaces a group)")
  return Study.for_script(
      tag, base, cells, seeds=seeds, run=train_and_attack,
      report=lambda res, out: report(res, out, quick),
      title="EnResNet, second pass: the paper's claims with seeds and tests (Fashion-MNIST)",
      spec=__file__, results="results/second", quick=quick, root=ROOT)


STUDY = make_study(False)
QUICK_STUDY = lambda: make_study(True)  # noqa: E731  (built on demand)


if __name__ == "__main__":
  sys.exit(jd.evaluation.study_main(make_study))   # --quick: make_study(True)
