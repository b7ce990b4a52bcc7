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
# # jaxdefense in a few minutes
#
# A residual network is a discretised flow: block *n* computes
# $x_{n+1} = x_n + f_n(x_n)$, one forward-Euler step of $\dot x = F(x, t)$.
# `jaxdefense` makes that step a one-line choice (Euler, Euler–Maruyama noise, damping,
# an adaptive ODE solve) and gives every model the same tools: training from a config,
# attacks, robustness tables and certified bounds.
#
# This notebook walks through all of it on the 8x8 scikit-learn digits, which ship with
# the library, so it needs no download and runs in a few minutes on a CPU.

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
import os
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jaxdefense as jd

# %matplotlib inline

# Quick mode (set by the tests): smaller sizes, fewer epochs and steps.
QUICK = os.environ.get("JAXDEFENSE_NOTEBOOK_QUICK") == "1"
print("devices:", jax.devices())   # a GPU/TPU runtime is used automatically

# %% [markdown]
# ## 1. Data
#
# `jd.data.load` returns NumPy arrays: NHWC float32 images in [0, 1] and int32 labels.
# `digits` is bundled; `mnist`, `fashion_mnist`, `cifar10`, `cifar100` load the same way.

# %%
train = jd.data.load("digits", "train")
test = jd.data.load("digits", "test")
print(train)
print(test)

fig, axes = plt.subplots(1, 10, figsize=(10, 1.3))
for ax, img, lab in zip(axes, test.images[:10], test.labels[:10]):
  ax.imshow(img[..., 0], cmap="gray_r", vmin=0, vmax=1)
  ax.set_title(int(lab))
  ax.axis("off")
plt.show()

# %% [markdown]
# ## 2. Models: a ResNet and an EnResNet
#
# Models are Flax modules created by preset name. The *step rule* of the residual blocks
# is an argument: `jd.dynamics.EulerMaruyama(coef=a)` turns every block into
# $x_{n+1} = x_n + f_n(x_n) + a\,\mathrm{std}(x_n + f_n(x_n))\,\xi_n$ with
# $\xi_n \sim N(0, I)$: an EnResNet, which draws noise in training *and* at test time
# (it needs a `"noise"` PRNG stream).

# %%
x = test.images[:8]
resnet = jd.models.create("resnet8", num_classes=10)
enresnet = jd.models.create("resnet8", num_classes=10,
                            step=jd.dynamics.EulerMaruyama(coef=0.1))

v_res = resnet.init(jax.random.key(0), x)
v_en = enresnet.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, x)
print("ResNet-8 parameters:  ", jd.models.count_params(v_res))
print("EnResNet-8 parameters:", jd.models.count_params(v_en), "(the noise adds none)")

# Two calls of the EnResNet with different noise keys give different logits.
f_en = jd.models.bind(enresnet, v_en)          # f_en(x, key) -> logits
print("stochastic:", f_en.stochastic)
print("logit change between two noise draws:",
      float(jnp.abs(f_en(x, jax.random.key(2)) - f_en(x, jax.random.key(3))).max()))

# %% [markdown]
# ## 3. Training from a config
#
# Training runs are described by `ml_collections` configs. The `demo` preset is a
# ResNet-8 on the digits; overrides are `key=value` strings (the same syntax as
# `--config.key=value` on the command line). `train_and_evaluate` writes checkpoints and
# `metrics.jsonl` into a workdir and resumes from it when run again.

# %%
EPOCHS = 2 if QUICK else 12
root = tempfile.mkdtemp(prefix="jaxdefense_quickstart_")
common = [f"epochs={EPOCHS}", "progress_bar=False"] + (["train_size=512"] if QUICK else [])
runs = {
    "ResNet": ["model.step.name=euler"],
    "EnResNet": ["model.step.name=euler_maruyama", "model.step.coef=0.1"],
}
workdirs = {}
for label, step in runs.items():
  config = jd.configs.get("demo", common + step)
  workdirs[label] = os.path.join(root, label)
  jd.training.train_and_evaluate(config, workdirs[label], verbose=False)

# %% [markdown]
# Each run left its metrics in `metrics.jsonl`; plot the test accuracy per epoch.

# %%
fig, ax = plt.subplots(figsize=(5, 3))
for label, wd in workdirs.items():
  rows = jd.training.read_metrics(os.path.join(wd, jd.training.METRICS_FILE))
  pts = [(r["epoch"], r["test/accuracy"]) for r in rows
         if "test/accuracy" in r and "epoch" in r]
  if pts:
    ax.plot(*zip(*pts), marker="o", label=label)
final = {label: [r for r in jd.training.read_metrics(os.path.join(wd, jd.training.METRICS_FILE))
                 if r.get("kind") == "final"][-1] for label, wd in workdirs.items()}
ax.set_xlabel("epoch")
ax.set_ylabel("test accuracy")
ax.legend()
plt.show()
for label, rec in final.items():
  print(f"{label}: final test accuracy {rec['test/accuracy']:.3f}")

# %% [markdown]
# ## 4. Attacks
#
# Attacks are pure functions of `(logits_fn, x, y, key)`. A saved run comes back as a
# model ready to call with `jd.evaluation.run_logits_fn`. For the noisy EnResNet, the
# attack's gradient must average over noise draws: `jd.attacks.eot(f, n)` (Expectation
# over Transformation) wraps the model so that PGD sees the mean of `n` draws.

# %%
EPS = 0.1            # the digits have 17 grey levels, 1/16 apart
N_ATTACK = 32 if QUICK else 360
xs, ys = test.images[:N_ATTACK], test.labels[:N_ATTACK]

f_res, _, _ = jd.evaluation.run_logits_fn(workdirs["ResNet"])
f_en, stochastic, _ = jd.evaluation.run_logits_fn(workdirs["EnResNet"])
print("EnResNet stochastic:", stochastic)

key = jax.random.key(0)
x_adv_res = jd.attacks.pgd(f_res, xs, ys, key=key, eps=EPS, step_size=EPS / 4, steps=10)
x_adv_en = jd.attacks.pgd(jd.attacks.eot(f_en, 5), xs, ys, key=key, eps=EPS,
                          step_size=EPS / 4, steps=10)


def accuracy(f, images, labels, key=None):
  logits = f(images) if key is None else f(images, key)
  return float((logits.argmax(-1) == labels).mean())


print(f"ResNet   clean {accuracy(f_res, xs, ys):.3f}  PGD-10 {accuracy(f_res, x_adv_res, ys):.3f}")
print(f"EnResNet clean {accuracy(f_en, xs, ys, key):.3f}  "
      f"PGD-10 (EOT-5) {accuracy(f_en, x_adv_en, ys, key):.3f}")

fig, axes = plt.subplots(2, 8, figsize=(10, 2.8))
pred = f_res(x_adv_res).argmax(-1)
for i in range(8):
  axes[0, i].imshow(xs[i, ..., 0], cmap="gray_r", vmin=0, vmax=1)
  axes[0, i].set_title(f"y={int(ys[i])}", fontsize=9)
  axes[1, i].imshow(np.asarray(x_adv_res[i, ..., 0]), cmap="gray_r", vmin=0, vmax=1)
  axes[1, i].set_title(f"pred {int(pred[i])}", fontsize=9)
for ax in axes.ravel():
  ax.axis("off")
fig.suptitle(f"ResNet: clean (top) and PGD-10 at eps {EPS} (bottom)")
plt.show()

# %% [markdown]
# ## 5. A robustness table
#
# `jd.evaluation.evaluate_robustness` runs an attack suite (here `quick`: FGSM and PGD)
# and optional corruptions, and returns a report; `stochastic=True` makes every attack
# use EOT. `accuracy_vs_eps` gives the points of an accuracy-vs-radius curve.

# %%
for label, f, sto in [("ResNet", f_res, False), ("EnResNet", f_en, True)]:
  report = jd.evaluation.evaluate_robustness(
      f, xs, ys, key=jax.random.key(1), eps=EPS, suite="quick", stochastic=sto,
      corruptions=("gaussian_noise",), severities=(3,) if QUICK else (1, 3, 5), progress=False,
      meta={"model": label})
  print(report.to_text())
  print()

# %%
eps_values = [0.0, 0.1, 0.2] if QUICK else [0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2]
curves = {
    "ResNet": jd.evaluation.accuracy_vs_eps(f_res, xs, ys, key=jax.random.key(2),
                                            eps_values=eps_values, attack="pgd"),
    "EnResNet (EOT-5)": jd.evaluation.accuracy_vs_eps(f_en, xs, ys, key=jax.random.key(2),
                                                      eps_values=eps_values, attack="pgd",
                                                      stochastic=True),
}
fig, ax = plt.subplots(figsize=(5, 3))
for label, pts in curves.items():
  e, acc = zip(*pts)
  ax.plot(e, acc, marker="o", label=label)
ax.set_xlabel("eps (l-inf, pixel units)")
ax.set_ylabel("accuracy under PGD")
ax.legend()
plt.show()

# %% [markdown]
# ## 6. Certified bounds
#
# The layers of `jaxdefense.nn` also run on abstract values: a `Box` (intervals) or a
# `HybridZonotope`. `jd.certify.bounds` pushes the whole l-inf ball of radius `eps`
# through the network and returns sound lower and upper bounds on every logit;
# `jd.certify.verify` says for which images no point of the ball changes the prediction.
# Zonotopes keep correlations between neurons and give tighter bounds than boxes.
# Box widths grow by roughly the norm of every layer, so on a ResNet they blow up within
# a few blocks. A naturally trained network is certifiable only at tiny radii, if at all;
# certified *training* (`jd.objectives`, DiffAI in `experiments/diffai/`) is what makes
# useful radii provable.
#
# `verify(..., sound=False)` certifies the real-valued network; the default `sound=True`
# also covers float32 rounding (outward-rounded bounds, as DiffAI's sound ReLU). On this
# ResNet the sound mode proves nothing even at tiny radii (its rounding margins dominate),
# so we show the real-valued certificate.

# %%
state, config = jd.training.restore(workdirs["ResNet"])
module = jd.training.build_model(config, num_classes=10)
variables = {"params": state.params, **state.model_state}

radii = [1e-6, 1e-5, 1e-3] if QUICK else [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3]
x8, y8 = xs[:8], ys[:8]
width, cert = {}, {}
for domain in ("box", "zonotope"):
  width[domain], cert[domain] = [], []
  for r in radii:
    lo, hi = jd.certify.bounds(module, variables, x8, r, domain=domain)
    width[domain].append(float((hi - lo).mean()))
    cert[domain].append(float(jd.certify.verify(module, variables, x8, y8, r, domain=domain,
                                                sound=False).mean()))
  print(domain, "certified fraction per radius:", dict(zip(radii, cert[domain])))

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3))
for domain in width:
  ax1.loglog(radii, width[domain], marker="o", label=domain)
  ax2.semilogx(radii, cert[domain], marker="o", label=domain)
ax1.set_xlabel("eps")
ax1.set_ylabel("mean logit interval width")
ax2.set_xlabel("eps")
ax2.set_ylabel("fraction certified")
ax2.set_ylim(-0.05, 1.05)
ax1.legend()
plt.show()

# %% [markdown]
# ## Going further
#
# - The same steps from the command line: `jaxdefense demo` (trains, attacks and compares
#   both networks), `jaxdefense train --config demo --workdir runs/demo`,
#   `jaxdefense attack --workdir runs/demo --suite fgsm,pgd:steps=20 --eps 0.1`,
#   `jaxdefense certify --workdir runs/demo --eps 0.0001 --domain zonotope`.
# - One notebook per paper: `enresnet.py` (noise and ensembles), `sonet.py` (ODE blocks).
# - The full experiments live in `experiments/<paper>/` of the repository, each with a
#   README; e.g. `python experiments/enresnet/small.py` then
#   `jaxdefense report experiments/enresnet/results/small`.
