# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # DiffAI: certified training by differentiable abstract interpretation
#
# *Mirman, Singh & Vechev, "A Provable Defense for Deep Residual Networks" (2019);
# Mirman, Gehr & Vechev, "Differentiable Abstract Interpretation for Provably Robust
# Neural Networks" (ICML 2018).*
#
# An attack finds *some* bad point in the ball $\{x' : \|x' - x\|_\infty \le \epsilon\}$;
# a certificate rules out *every* point. DiffAI runs the network on the whole ball at
# once, represented in an abstract domain: a **box** (one interval per neuron) or a
# **hybrid zonotope**
#
# $$z = c + b \odot \beta + E^\top e, \qquad \beta \in [-1, 1]^p,\ e \in [-1, 1]^m,$$
#
# a centre $c$, an uncorrelated box part $b$ and $m$ correlated generators $E$. Affine
# layers map the set exactly or soundly, ReLUs are relaxed, and the output set gives
# sound bounds on the logits. Image $x$ with label $t$ is **proved** when the lower bound
# of $z_t - z_j$ is positive for every $j \ne t$.
#
# Every transformer is differentiable, so the worst-case logits of the set can be
# trained against. How much of that worst case enters the loss, on which set, and when,
# is written in a small **training language** (`Mix(Point, Sub(Lin(...), Box), ...)`).
#
# This notebook shows both domains on a 2-D toy and on a zoo network, the language, and
# a small network trained with DiffAI's Baseline scheme on the bundled 8x8 digits,
# against a naturally trained twin.

# %% Install (skipped when jaxdefense is already importable)
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("jaxdefense") is None:
  # In a fresh Colab runtime: set JAXDEFENSE_PIP_SPEC to a pip requirement, e.g.
  # "jaxdefense @ git+https://HOST/OWNER/jaxdefense" or a wheel path, before running.
  spec = os.environ.get("JAXDEFENSE_PIP_SPEC", "jaxdefense")
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", spec])

# %%
import itertools
import os
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from scipy.spatial import ConvexHull   # a dependency of jax

import jaxdefense as jd

# %matplotlib inline

# Quick mode (set by the tests): smaller sizes, fewer epochs and steps.
QUICK = os.environ.get("JAXDEFENSE_NOTEBOOK_QUICK") == "1"
print("devices:", jax.devices())   # a GPU/TPU runtime is used automatically

test = jd.data.load("digits", "test")

# %% [markdown]
# ## 1. Two abstract domains
#
# The layers of `jd.nn` accept arrays and abstract values alike. Below, a 2-D input
# square $[0, 1]^2$ (`jd.certify.input_set(x, eps, domain)` with $x = (0.5, 0.5)$,
# $\epsilon = 0.5$) goes through `Dense(2)`, a ReLU and a second `Dense(2)`; grey dots are
# 2,000 sampled inputs pushed through the same layers.
#
# * **box**: after the rotation of the first layer it is already the bounding rectangle
#   of the true image, and every later layer starts from that over-approximation.
# * **hybrid zonotope** (DiffAI's domain, here with one generator per input pixel and
#   the box ReLU): the generators $E$ go exactly through affine layers, the box part
#   $b$ as $|W|\,b$ (each output gets its own independent interval). The ReLU keeps an
#   always-active neuron as it is, zeroes an inactive one and turns a *crossing* neuron
#   ($l < 0 < u$) into the box part $[0, u]$, dropping its correlations. Its interval
#   bounds are never wider than the box domain's.
# * **DeepZ** (`domain="deepz"`, the minimal-area ReLU): a crossing neuron becomes
#   $\lambda x + \mu \pm \mu$ with a new generator. It keeps correlations, but its
#   interval lower bound at a crossing neuron is negative, so it is not uniformly
#   tighter than the box ReLU.

# %%
dense = jd.nn.Dense(2)
first = {"params": {"kernel": jnp.array([[1.0, 1.0], [1.0, -1.0]]),
                    "bias": jnp.array([0.2, 0.1])}}        # neuron 1 active, neuron 2 crossing
second = {"params": {"kernel": jnp.array([[1.0, 0.5], [-1.0, 1.0]]), "bias": jnp.zeros(2)}}
stages = {
    "Dense": lambda v: dense.apply(first, v),
    "Dense, ReLU": lambda v: jd.nn.relu(dense.apply(first, v)),
    "Dense, ReLU, Dense": lambda v: dense.apply(second, jd.nn.relu(dense.apply(first, v))),
}


def polygon(value):
  """The 2-D set of a Box or HybridZonotope of shape [1, 2], as polygon vertices."""
  if isinstance(value, jd.certify.Box):
    (lo,), (hi,) = (np.asarray(a) for a in value.concretize())
    return np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
  # c + b * beta + sum_j E_j e_j: a zonotope with generators E_j and b_1 u_1, b_2 u_2.
  gens = [np.asarray(g[0]) for g in value.generators] + list(np.diag(np.asarray(value.box[0])))
  corners = np.array([np.asarray(value.center()[0]) + np.dot(s, gens)
                      for s in itertools.product((-1.0, 1.0), repeat=len(gens))])
  return corners[ConvexHull(corners).vertices]


x0 = jnp.array([[0.5, 0.5]])
samples = jax.random.uniform(jax.random.key(0), (2000, 2))
styles = {"box": dict(fill=False, ec="C0", lw=2),
          "zonotope": dict(fc="C1", ec="C1", alpha=0.35),
          "deepz": dict(fill=False, ec="C2", ls="--", lw=1.5)}
fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
for ax, (title, f) in zip(axes, stages.items()):
  points = np.asarray(f(samples))
  for domain, style in styles.items():
    z = f(jd.certify.input_set(x0, 0.5, domain))
    lo, hi = (np.asarray(a)[0] for a in z.concretize())
    assert np.all((points >= lo - 1e-6) & (points <= hi + 1e-6)), (title, domain)
    ax.add_patch(plt.Polygon(polygon(z), label=domain, **style))
  ax.scatter(points[:, 0], points[:, 1], s=1, color="0.3", zorder=3)
  ax.autoscale_view()
  ax.margins(0.05)
  ax.set_title(f"after {title}")
axes[0].legend(loc="lower right", fontsize=8)
plt.show()

# %% [markdown]
# After the first `Dense` the zonotope is the exact image. After the ReLU (one neuron
# active, one crossing) the hybrid zonotope is the same rectangle as the box: the
# crossing neuron is now an uncorrelated interval $[0, u]$. The second `Dense` mixes both
# neurons: the active one's generators still move exactly (the diagonal band), while
# the crossing one's interval spreads independently onto both outputs, so the set cuts
# two corners off the box but has the same interval bounds. DeepZ (dashed) dips below
# zero after the ReLU; at the end it is tighter than the hybrid zonotope in some
# directions and looser in others.
#
# ### Sound bounds of a zoo network
#
# The DiffAI zoo (`ffnn`, `conv_small`, `conv_med`, ...; `jd.models.describe`) is built
# from the same layers, so `jd.certify.bounds(model, variables, x, eps, domain)`
# certifies any of them with no second definition. `conv_small` uses unpadded 4x4 /
# stride-2 convolutions, which shrink an 8x8 digit to nothing, so this notebook uses
# `conv_med` (padded). Every logit of sampled points of the ball, here an untrained
# network at $\epsilon = 0.02$, must fall inside the bounds.

# %%
net = jd.models.create("conv_med", num_classes=10)
x4 = test.images[:4]
net_vars = net.init(jax.random.key(0), x4)
print(jd.models.describe("conv_med"))
print("ReLU neurons per 8x8 image:", jd.certify.count_neurons(net, net_vars, x4),
      " parameters:", jd.models.count_params(net_vars))

EPS_DEMO = 0.02
n_samples = 128 if QUICK else 1024
k1, k2 = jax.random.split(jax.random.key(1))
corners = x4 + EPS_DEMO * jax.random.rademacher(k1, (n_samples // 2,) + x4.shape)
uniform = x4 + jax.random.uniform(k2, (n_samples // 2,) + x4.shape, minval=-EPS_DEMO,
                                  maxval=EPS_DEMO)
pts = jnp.clip(jnp.concatenate([corners, uniform]), 0.0, 1.0)     # the ball, clipped to [0, 1]
sampled = jax.vmap(lambda p: net.apply(net_vars, p))(pts)          # [n, 4, 10]

bnds = {}
for domain in ("box", "zonotope"):
  lo, hi = jd.certify.bounds(net, net_vars, x4, EPS_DEMO, domain=domain)
  bnds[domain] = (np.asarray(lo), np.asarray(hi))
  inside = bool(jnp.all((sampled >= lo) & (sampled <= hi)))
  print(f"{domain:9s} all {sampled.shape[0]} samples inside: {inside}   "
        f"mean logit interval width {float((hi - lo).mean()):.4f}")

fig, ax = plt.subplots(figsize=(7, 3))
classes = np.arange(10)
for shift, (domain, (lo, hi)) in zip((-0.15, 0.15), bnds.items()):
  ax.errorbar(classes + shift, (lo[0] + hi[0]) / 2, yerr=(hi[0] - lo[0]) / 2, fmt="none",
              capsize=4, lw=2, label=f"{domain} bounds")
ax.scatter(np.repeat(classes[None], sampled.shape[0], 0).ravel(),
           np.asarray(sampled[:, 0]).ravel(), s=2, color="0.3", label="sampled points")
ax.set_xticks(classes)
ax.set_xlabel("class")
ax.set_ylabel("logit")
ax.set_title(f"untrained conv_med, image 0, eps {EPS_DEMO}")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 2. The training language
#
# A DiffAI objective is a *goal* applied to the training box $[l, u] = [\max(x - \epsilon,
# 0), \min(x + \epsilon, 1)]$: concrete goals (`Point`, the box's centre; `Normal`,
# `Uniform`, random points; `IFGSM(k)`, an attack point) take the cross-entropy of a
# point; abstract goals (`Box`, `HBox`, `Zonotope`, `DeepZ`) the cross-entropy of the
# worst-case logits of the set; combinators build on them (`Mix(a, b, lam)` is
# $(1 - \lambda)\,\mathrm{loss}_a + \lambda\,\mathrm{loss}_b$, `Sub(delta, g)` runs `g` on
# the box shrunk by `delta` about its centre, `Sample`, `BiSample`, `DeepLoss`). Numbers
# may be schedules over fractional epochs: `Lin(a, b, m, n)` holds `a` for `m` epochs,
# then goes linearly to `b` over `n`.
#
# `jd.objectives.parse` reads the text (a LALR grammar: nothing in it is evaluated) into
# a frozen, hashable objective; `str()` prints it back.

# %%
text = "Mix(Point, Sub(Lin(0, 1, 0.5, 3), Box), Lin(0, 0.5, 0.5, 3))"
objective = jd.objectives.parse(text, eps=0.1)
print(objective)
print("round trip:", jd.objectives.parse(str(objective)) == objective)

O = jd.objectives   # the same goal, built in Python
built = O.Mix(O.Point(), O.Sub(O.Lin(0, 1, 0.5, 3), O.Box()), O.Lin(0, 0.5, 0.5, 3))
print("built in Python:", built == objective.goal)

# %% [markdown]
# This is the paper's **Baseline** (table 2) with its schedules shortened: the box grows
# from the centre point to the full $\epsilon$-box while the worst-case weight
# $\lambda$ goes from 0 to 0.5, both between epochs 0.5 and 3.5. (`Point` is the centre of
# the *clipped* box, which differs from $x$ where a pixel lies within $\epsilon$ of 0 or 1,
# as most of a digit's background does.)

# %%
t = jnp.linspace(0.0, 5.0, 201)
sub, mix = objective.goal.b, objective.goal
_, lam = mix.weights(t)
fig, ax = plt.subplots(figsize=(5, 2.8))
ax.plot(t, objective.eps * sub.delta(t), label="training radius eps(t)")
ax.plot(t, lam, label="worst-case weight lambda(t)")
ax.set_xlabel("epoch")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The schemes of table 2 are presets (`jd.objectives.PRESETS`, with the paper's 200-epoch
# schedules); `parse` accepts their names.

# %%
print(len(jd.objectives.PRESETS), "presets:", ", ".join(sorted(jd.objectives.PRESETS)[:12]), "...")
for name in ("Baseline", "InSamp", "Adv3IS"):
  print(f"{name:9s}", jd.objectives.PRESETS[name])
print(jd.objectives.parse("InSamp", eps=0.3))

# %% [markdown]
# Text outside the language, a misspelt name or a value out of range is a
# `LanguageError` (a `ValueError`) that points at the offending character.

# %%
for bad in ("__import__('os')", "Mix(Pont, Box, 0.5)", "Sub(-0.5, Box)"):
  try:
    jd.objectives.parse(bad)
  except jd.objectives.LanguageError as err:
    print(err, end="\n\n")

# %% [markdown]
# ## 3. Certified training on the digits
#
# A DiffAI objective is an ordinary objective of the training loop: the `demo` config
# with `objective.name=diffai` and the text (epochs and the schedules scaled to the
# run), `conv_med`, and Adam as in DiffAI. The twin has the same config with the
# natural objective. The training step passes the fractional epoch to the schedules.

# %%
EPS = 0.1          # the digits have 17 grey levels, 1/16 apart
EPOCHS = 4 if QUICK else 60
HOLD, RAMP = (0.5, 2) if QUICK else (6, 30)
scheme = f"Mix(Point, Sub(Lin(0, 1, {HOLD}, {RAMP}), Box), Lin(0, 0.5, {HOLD}, {RAMP}))"
common = [f"epochs={EPOCHS}", "progress_bar=False", "model.name=conv_med", "optimizer.name=adam",
          "optimizer.learning_rate=0.003", "optimizer.weight_decay=0.0"]
common += ["train_size=512"] if QUICK else []
runs = {
    "DiffAI": ["objective.name=diffai", f"objective.text={scheme}", f"objective.eps={EPS}"],
    "natural": ["objective.name=natural"],
}
root = tempfile.mkdtemp(prefix="jaxdefense_diffai_")
trained = {}
for label, objective_overrides in runs.items():
  config = jd.configs.get("demo", common + objective_overrides)
  print(f"{label}: training with", jd.objectives.from_config(config.objective))
  state = jd.training.train_and_evaluate(config, os.path.join(root, label), verbose=False)
  trained[label] = (jd.training.build_model(config, num_classes=10),
                    {"params": state.params, **state.model_state})

# %% [markdown]
# ## 4. Standard, attacked and certified accuracy
#
# `jd.certify.report` measures, at $\epsilon$, the standard accuracy, PGD accuracy (an
# upper bound of the robust accuracy) and the certified accuracy in each domain (a lower
# bound). `verify` is sound for the float32 network by default (`sound=True`: every
# bound rounded outwards for float rounding); `sound=False` certifies the real-valued
# network and never proves fewer images.

# %%
N = 64 if QUICK else 360
STEPS = 5 if QUICK else 20
xs, ys = test.images[:N], test.labels[:N]
rows = []
for label, (model, variables) in trained.items():
  r = jd.certify.report(model, variables, xs, ys, EPS, key=jax.random.key(0), pgd_steps=STEPS)
  real = jd.evaluation.certified_accuracy(model, variables, (xs, ys), EPS, "zonotope",
                                          progress=False, sound=False)
  rows.append([label, f"{r['standard']:.3f}", f"{r['pgd']:.3f}", f"{r['certified_box']:.3f}",
               f"{r['certified_zonotope']:.3f}", f"{real:.3f}"])
print(f"{N} test images, eps {EPS}, PGD-{STEPS}\n")
print("\n".join(jd.evaluation.markdown_table(
    ["training", "standard", "PGD", "certified box", "certified zonotope",
     "zonotope, sound=False"], rows)))

# %% [markdown]
# Certified accuracy against $\epsilon$ (`jd.evaluation.certified_accuracy`), with PGD
# accuracy (`jd.evaluation.accuracy_vs_eps`) above it: the true robust accuracy lies
# between a network's PGD curve and its certified ones. For the natural twin the
# certificates vanish within a few hundredths (the box proves nothing beyond the
# smallest radius) and PGD alone shows it is not robust at $\epsilon = 0.1$; the DiffAI
# network keeps most of its accuracy certified up to the training radius, for a small
# cost in standard accuracy, with the zonotope proving at least what the box does.

# %%
eps_grid = [0.0, 0.01, 0.05, 0.1] if QUICK else [0.0, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
                                                 0.12, 0.15, 0.2]
fig, ax = plt.subplots(figsize=(6, 3.5))
for color, (label, (model, variables)) in zip(("C0", "C3"), trained.items()):
  for domain, style in (("zonotope", "-"), ("box", "--")):
    acc = [jd.evaluation.certified_accuracy(model, variables, (xs, ys), e, domain,
                                            progress=False) for e in eps_grid]
    ax.plot(eps_grid, acc, style, color=color, marker="o", ms=3,
            label=f"{label}, certified ({domain})")
  pgd = jd.evaluation.accuracy_vs_eps(
      jd.models.bind(model, variables), xs, ys, key=jax.random.key(1), eps_values=eps_grid,
      attack=f"pgd:steps={STEPS},step_fraction={2.5 / STEPS}")
  ax.plot(*zip(*pgd), ":", color=color, label=f"{label}, PGD-{STEPS}")
ax.axvline(EPS, color="gray", lw=0.8)
ax.set_xlabel("eps (l-inf, pixel units)")
ax.set_ylabel("accuracy")
ax.set_ylim(-0.03, 1.03)
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# ## The full experiment
#
# `experiments/diffai/` in the repository: DiffAI's ConvSmall and ConvMed on
# Fashion-MNIST at $\epsilon = 0.1$, trained for 6 epochs with the Baseline scheme (as
# `jd.objectives.CertifiedObjective`, box domain), then standard, PGD-20 and certified
# accuracy with the box, the hybrid zonotope and DeepZ. The committed
# `experiments/diffai/results/report.md` (one seed, 2-core CPU):
#
# | network | standard | PGD | certified box | certified hybrid zonotope | certified DeepZ | train time |
# |---|---|---|---|---|---|---|
# | conv_small | 77.9 % ± 0.4 | 63.1 % ± 0.5 | 57.9 % ± 0.5 | 58.7 % ± 1.6 (first 1000) | 51.4 % ± 2.2 (first 500) | 2.3 min |
# | conv_med | 80.7 % ± 0.4 | 66.9 % ± 0.5 | 62.3 % ± 0.5 | 63.5 % ± 1.5 (first 1000) | 55.2 % ± 2.2 (first 500) | 4.3 min |
#
# ConvMed certifies more than ConvSmall (box: +4.4 points, p = 2.77e-10, *held*); the
# hybrid zonotope's gain over the box on the same 1,000 images (+0.6 points for each
# network) is *inconclusive*; DeepZ proves fewer images than the box on these
# box-trained networks (51.4 vs 58.8 % and 55.2 vs 64.0 % on the first 500). The paper
# reports 97.8 / 96.2 / 95.5 % (standard / attacked / proved) for ConvSmall on MNIST
# after 200+ epochs on a GPU.
#
# `experiments/diffai/schemes.py` compares the training schemes of table 2 (Baseline,
# InSamp, InSampLPA, Adv3IS, Baseline + DeepLoss), written in the language above, on
# ConvSmall with two seeds each.
#
# ```bash
# python experiments/diffai/run.py                            # run or resume both cells
# python experiments/diffai/run.py --cell conv_med --seed 0   # one cell
# python -m jaxdefense report experiments/diffai/results      # report.md only
# python experiments/diffai/schemes.py                        # the schemes of table 2
# python experiments/diffai/run.py --quick                    # smoke run
# ```
