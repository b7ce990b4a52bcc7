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
# # EnResNet: noisy residual blocks and Feynman–Kac ensembles
#
# *Wang et al., "ResNets Ensemble via the Feynman–Kac Formalism to Improve Natural and
# Robust Accuracies".*
#
# A ResNet is the forward-Euler discretisation of $\dot x = F(x, t)$, and its classifier
# can be read as the solution $u(x, 0)$ of a transport equation. Adding a diffusion term
# $\tfrac12\sigma^2\Delta u$ smooths that solution; by the Feynman–Kac formula it becomes
# an expectation over a stochastic flow,
# $u(x, 0) = \mathbb{E}[f(x(1)) \mid x(0) = x]$ with $dx = F\,dt + \sigma\,dB$.
# Discretised by Euler–Maruyama, every residual block gains a noise term,
#
# $$x_{n+1} = x_n + f_n(x_n) + a\,\mathrm{std}\big(x_n + f_n(x_n)\big)\,\xi_n,
# \qquad \xi_n \sim N(0, I),$$
#
# applied in training *and* at test time, and the expectation is estimated by averaging
# several noisy networks (an ensemble, "En$_n$ResNet"). Attacking such a model honestly
# needs gradients averaged over noise draws (EOT).
#
# This notebook trains a small En$_2$ResNet on the bundled digits and looks at the noise,
# the two ways of averaging, the number of noise draws, and EOT against plain PGD.

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

test = jd.data.load("digits", "test")

# %% [markdown]
# ## 1. A noise block
#
# The step rule `jd.dynamics.EulerMaruyama(coef=a)` replaces the Euler step of every
# residual block. The noise comes from the `"noise"` PRNG stream, so the same image gives
# a different prediction on every call. Below: the class probabilities of one (untrained)
# network over 200 noise draws, for three noise coefficients $a$.

# %%
x1 = test.images[:1]
fig, axes = plt.subplots(1, 3, figsize=(11, 2.6), sharey=True)
for ax, coef in zip(axes, (0.1, 0.4, 1.0)):
  net = jd.models.create("resnet8", num_classes=10, step=jd.dynamics.EulerMaruyama(coef=coef))
  variables = net.init({"params": jax.random.key(0), "noise": jax.random.key(0)}, x1)
  f = jd.models.bind(net, variables)
  keys = jax.random.split(jax.random.key(1), 200)
  probs = jax.nn.softmax(jax.vmap(lambda k: f(x1, k)[0])(keys))   # [200, 10]
  ax.boxplot(np.asarray(probs), showfliers=False)
  ax.set_xticks(range(1, 11), range(10))
  ax.set_title(f"a = {coef}")
  ax.set_xlabel("class")
axes[0].set_ylabel("softmax probability")
fig.suptitle("spread of an untrained EnResNet-8's output over 200 noise draws", y=1.05)
plt.show()

# %% [markdown]
# ## 2. Training an En$_2$ResNet
#
# The `demo` config (a ResNet-8 on the digits) with the Euler–Maruyama step and an
# ensemble of two independently parametrised members trained jointly
# (`ensemble.size=2`). The members' variables are one pytree with a leading axis of
# length 2, applied with `vmap`.

# %%
EPOCHS = 2 if QUICK else 12
workdir = tempfile.mkdtemp(prefix="jaxdefense_enresnet_")
overrides = [f"epochs={EPOCHS}", "progress_bar=False", "model.step.name=euler_maruyama",
             "model.step.coef=0.1", "ensemble.size=2"] + (["train_size=512"] if QUICK else [])
config = jd.configs.get("demo", overrides)
state = jd.training.train_and_evaluate(config, workdir, verbose=False)

ensemble = jd.training.build_model(config, num_classes=10)
variables = {"params": state.params, **state.model_state}
print(type(ensemble).__name__, "of", ensemble.size, "members, average =", repr(ensemble.average))
print("parameters:", jd.models.count_params(variables))

# %% [markdown]
# ## 3. Averaging logits or probabilities
#
# The authors' code averages the members' **logits**; the Feynman–Kac formula, with the
# softmax as the terminal function, averages **probabilities**. `models.Ensemble` does
# either (`average="logits"` or `"probs"`); both share the same variables, so we can
# compare them on the trained network, together with each member alone.

# %%
N_EVAL = 120 if QUICK else 360
xs, ys = test.images[:N_EVAL], test.labels[:N_EVAL]
key = jax.random.key(0)


def accuracy(f, images, labels, key):
  return float((f(images, key).argmax(-1) == labels).mean())


f_logits = jd.models.bind(ensemble, variables)
f_probs = jd.models.bind(ensemble.clone(average="probs"), variables)
for i in range(ensemble.size):
  f_i = jd.models.bind(ensemble.member, jd.models.member_variables(variables, i))
  print(f"member {i}:            {accuracy(f_i, xs, ys, key):.3f}")
print(f"ensemble, logits avg: {accuracy(f_logits, xs, ys, key):.3f}")
print(f"ensemble, probs avg:  {accuracy(f_probs, xs, ys, key):.3f}")

# %% [markdown]
# ## 4. More noise draws: a Monte-Carlo Feynman–Kac average
#
# One call of the network is one sample of the stochastic flow. Averaging $n$ calls with
# independent noise is a Monte-Carlo estimate of the expectation; accuracy should settle
# as $n$ grows. We average the ensemble's outputs over $n$ draws, both ways.

# %%
DRAWS = [1, 2, 4, 8] if QUICK else [1, 2, 4, 8, 16, 32]
member_fn = jd.models.bind(ensemble.member, jd.models.member_variables(variables, 0))


def draws(f, images, n, key):
  """Logits of ``n`` independent noise draws, ``[n, B, K]``."""
  return jax.vmap(lambda k: f(images, k))(jax.random.split(key, n))


def averaged_accuracy(logits, labels, how):
  """Accuracy of the average of ``logits [n, B, K]`` over its first axis."""
  avg = logits.mean(0) if how == "logits" else jnp.log(jax.nn.softmax(logits).mean(0))
  return float((avg.argmax(-1) == labels).mean())


fig, ax = plt.subplots(figsize=(5.5, 3.2))
for label, f in [("En2 ensemble", f_logits), ("one member (En1)", member_fn)]:
  logits = draws(f, xs, DRAWS[-1], jax.random.key(3))   # the first n draws serve every n
  for how, style in [("logits", "-"), ("probs", "--")]:
    acc = [averaged_accuracy(logits[:n], ys, how) for n in DRAWS]
    ax.plot(DRAWS, acc, style, marker="o", label=f"{label}, {how}")
ax.set_xscale("log", base=2)
ax.set_xlabel("noise draws averaged")
ax.set_ylabel("clean accuracy")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 5. EOT against plain PGD
#
# Plain PGD on a noisy model follows the gradient of *one* noise realisation (here a fixed
# key), which the next call no longer uses. Expectation over Transformation
# (`jd.attacks.eot(f, n)`) averages the loss, hence the gradient, over `n` fresh draws
# per step: the attack the EnResNet paper uses. A robustness claim for a noisy model is
# only meaningful against EOT.

# %%
EPS = 0.1          # the digits have 17 grey levels, 1/16 apart
STEPS = 5 if QUICK else 20
N_ADV = 48 if QUICK else 360
xa, ya = test.images[:N_ADV], test.labels[:N_ADV]
fixed = jax.random.key(42)
attacks = {
    "clean": None,
    "PGD, one fixed draw": lambda: jd.attacks.pgd(lambda x: f_logits(x, fixed), xa, ya,
                                                  key=key, eps=EPS, steps=STEPS),
    "PGD + EOT-1": lambda: jd.attacks.pgd(jd.attacks.eot(f_logits, 1), xa, ya, key=key,
                                          eps=EPS, steps=STEPS),
    "PGD + EOT-5": lambda: jd.attacks.pgd(jd.attacks.eot(f_logits, 5), xa, ya, key=key,
                                          eps=EPS, steps=STEPS),
}
results = {}
for name, attack in attacks.items():
  x_eval = xa if attack is None else attack()
  results[name] = averaged_accuracy(draws(f_logits, x_eval, 8, jax.random.key(7)), ya,
                                    "logits")
  print(f"{name:22s} accuracy (8-draw average) {results[name]:.3f}")

fig, ax = plt.subplots(figsize=(6, 2.8))
ax.barh(list(results), list(results.values()))
ax.invert_yaxis()
ax.set_xlabel(f"accuracy at eps {EPS}, PGD-{STEPS}")
ax.set_xlim(0, 1)
plt.show()

# %% [markdown]
# The library's evaluation does the same with `stochastic=True`: every attack of the suite
# then uses EOT (`eot_samples=5` by default).

# %%
report = jd.evaluation.evaluate_robustness(f_logits, xa, ya, key=jax.random.key(9), eps=EPS,
                                           suite="quick", stochastic=True, progress=False)
print(report.to_text())

# %% [markdown]
# ## The full experiment
#
# `experiments/enresnet/` in the repository (see its README):
#
# ```bash
# # Fashion-MNIST on a CPU: eleven cells (ResNet, En1/En2/En5, shared-weights ensembles,
# # a noise-coefficient sweep), PGD adversarial training, FGSM / IFGSM-20 / C&W / APGD
# # with EOT, about two hours on 2 cores
# python experiments/enresnet/small.py
# python experiments/enresnet/small.py list                        # grid and status
# python -m jaxdefense report experiments/enresnet/results/small   # report.md and plots
#
# # CIFAR-10 with the paper's recipe (GPU)
# jaxdefense train  --config enresnet_paper:cifar10,en2_resnet20 --workdir runs/c10_en2_r20
# jaxdefense attack --workdir runs/c10_en2_r20 --suite enresnet --eps 8/255 --which best
# ```
