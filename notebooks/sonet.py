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
# # SONet: stable neural ODE blocks, and is their robustness gradient masking?
#
# *"Stable neural ODE with Lyapunov-stable equilibrium points" (SONet); we have its
# abstract only, so the parametrisation below is ours (AntisymmetricRNN /
# Haber–Ruthotto line).*
#
# A SONet replaces residual blocks by ODE blocks $\dot x = \phi(Ax + b)$ whose operator is
# **skew-symmetric** up to a damping: for a convolution $K$ with adjoint $K^\top$,
#
# $$\frac{dx}{dt} = \tanh\big(Kx - K^\top x - \gamma x + b\big).$$
#
# $K - K^\top$ has purely imaginary eigenvalues, so $-\gamma$ moves them to real part
# $-\gamma$: the linearised flow neither explodes nor collapses, and small input
# perturbations stay small. The blocks are solved with an adaptive solver (Dopri5), and
# the abstract reports high PGD accuracy after *natural* training, but argues that much
# of it is **gradient masking** by the adaptive solver. The check: attack through Dopri5,
# and transfer attacks from a *fixed-step twin* (same weights, RK4 with fixed steps,
# ordinary gradients). If the transferred attack were much stronger, the white-box
# gradients would be the problem.

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
# ## 1. A skew-symmetric convolution field
#
# `jd.nn.SkewSymmetricConv` is the vector field. With the identity activation and no
# bias it is linear, so we can take its Jacobian on a small 4x4x2 state (32 numbers) and
# look at the eigenvalues: on the imaginary axis for $\gamma = 0$, shifted to real part
# $-\gamma$ otherwise. An unconstrained convolution field (for contrast) has eigenvalues
# with positive real parts, i.e. directions that grow.

# %%
x_small = jax.random.normal(jax.random.key(0), (1, 4, 4, 2))


def field_eigs(gamma):
  field = jd.nn.SkewSymmetricConv(gamma=gamma, act="identity", use_bias=False)
  params = field.init(jax.random.key(1), x_small)
  jac = jax.jacfwd(lambda z: field.apply(params, z.reshape(x_small.shape)).ravel())(
      x_small.ravel())
  return np.linalg.eigvals(np.asarray(jac)), params


fig, ax = plt.subplots(figsize=(5, 4))
for gamma in (0.0, 0.5):
  eigs, params = field_eigs(gamma)
  ax.scatter(eigs.real, eigs.imag, s=18, label=f"skew-symmetric, gamma={gamma}")
# The same kernel used as a plain convolution (no skew part): eigenvalues of K itself.
kernel = jax.tree_util.tree_leaves(params)[0]
plain = lambda z: jax.lax.conv_general_dilated(
    z.reshape(x_small.shape), kernel, (1, 1), "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC")).ravel()
eigs_plain = np.linalg.eigvals(np.asarray(jax.jacfwd(plain)(x_small.ravel())))
ax.scatter(eigs_plain.real, eigs_plain.imag, s=18, marker="x", label="plain conv K")
ax.axvline(0, color="gray", lw=0.8)
ax.set_xlabel("real part")
ax.set_ylabel("imaginary part")
ax.legend(fontsize=8)
ax.set_title("Jacobian eigenvalues of the field")
plt.show()

# %% [markdown]
# ## 2. A small SONet, trained naturally
#
# `models.create("sonet_small")` stacks a stem convolution, an ODE block of 16 channels, a
# strided convolution, an ODE block of 32 channels and a classifier: every block is a
# diffrax Dopri5 solve on $[0, 1]$ (rtol = atol = 1e-3). It trains from the `demo` config
# like any other model.

# %%
EPOCHS = 1 if QUICK else 8
workdir = tempfile.mkdtemp(prefix="jaxdefense_sonet_")
overrides = [f"epochs={EPOCHS}", "progress_bar=False", "model.name=sonet_small"]
if QUICK:
  overrides += ["train_size=384"]
config = jd.configs.get("demo", overrides)
state = jd.training.train_and_evaluate(config, workdir, verbose=False)
sonet = jd.training.build_model(config, num_classes=10)
variables = {"params": state.params, **state.model_state}
f_sonet = jd.models.bind(sonet, variables)
print("parameters:", jd.models.count_params(variables))

# %% [markdown]
# ## 3. Solver statistics
#
# Every ODE block sows its solver statistics (accepted and rejected steps, function
# evaluations forward and backward) into the `"ode_stats"` collection; ask for it with
# `mutable=["ode_stats"]`.

# %%
N = 64 if QUICK else 360
xs, ys = test.images[:N], test.labels[:N]


def ode_stats(model, images):
  _, st = model.apply(variables, images, mutable=["ode_stats"])
  return {block: {k: int(np.asarray(v[0])) for k, v in s.items()}
          for block, s in st["ode_stats"].items()}


for block, s in ode_stats(sonet, xs).items():
  print(block, s)

# %% [markdown]
# ## 4. The fixed-step twin
#
# `models.fixed_step_twin(sonet, "rk4", n_steps=4)` is the same network, with the same
# variables, solved with 4 fixed RK4 steps: an ordinary deep network whose gradients do
# not go through an adaptive step-size controller. If both solvers are accurate, the two
# models agree on almost every image.

# %%
twin = jd.models.fixed_step_twin(sonet, "rk4", n_steps=4)
f_twin = jd.models.bind(twin, variables)
pred_sonet, pred_twin = f_sonet(xs).argmax(-1), f_twin(xs).argmax(-1)
print(f"Dopri5 accuracy {float((pred_sonet == ys).mean()):.3f}, "
      f"RK4-4 twin accuracy {float((pred_twin == ys).mean()):.3f}, "
      f"agreement {float((pred_sonet == pred_twin).mean()):.3f}")

# %% [markdown]
# ## 5. A miniature masking check
#
# Three PGD attacks, all evaluated on the Dopri5 model: white-box through the adaptive
# solver (gradients of the recursive-checkpoint solve), white-box on the twin, and
# transferred from the twin. Then the solver statistics on the adversarial images: a
# solver that takes very different steps there would hint at an obfuscated gradient.

# %%
EPS = 0.1          # the digits have 17 grey levels, 1/16 apart
STEPS = 5 if QUICK else 20
N_ADV = 32 if QUICK else 360
xa, ya = test.images[:N_ADV], test.labels[:N_ADV]
key = jax.random.key(0)

x_white = jd.attacks.pgd(f_sonet, xa, ya, key=key, eps=EPS, steps=STEPS)
x_twin = jd.attacks.pgd(f_twin, xa, ya, key=key, eps=EPS, steps=STEPS)


def acc(f, images):
  return float((f(images).argmax(-1) == ya).mean())


results = {
    "clean": acc(f_sonet, xa),
    "PGD through Dopri5": acc(f_sonet, x_white),
    "PGD on the twin (white-box)": acc(f_twin, x_twin),
    "PGD transferred from the twin": acc(f_sonet, x_twin),
}
for name, value in results.items():
  print(f"{name:32s} {value:.3f}")
print("solver statistics on clean images:      ", ode_stats(sonet, xa))
print("solver statistics on adversarial images:", ode_stats(sonet, x_white))

fig, ax = plt.subplots(figsize=(6, 2.8))
ax.barh(list(results), list(results.values()))
ax.invert_yaxis()
ax.set_xlim(0, 1)
ax.set_xlabel(f"accuracy of the Dopri5 SONet, eps {EPS}, PGD-{STEPS}")
plt.show()

# %% [markdown]
# Transfer from the twin no stronger than white-box PGD through Dopri5 means the solver's
# gradients are informative: no sign of masking at this scale. The library's
# `jd.evaluation.diagnose` runs a fuller set of checks (SPSA, accuracy vs eps, random
# restarts...). A few epochs on the digits prove little either way; the study below does
# it properly.
#
# ## The full experiment
#
# `experiments/sonet/` in the repository (see its README): a SONet-8 and a ResNet-8
# trained naturally on Fashion-MNIST, then PGD through Dopri5 with both gradient modes,
# CW-inf, APGD-CE / DLR, SPSA, transfers from the RK4 twin and from the ResNet, solver
# tolerance sweeps and `evaluation.diagnose`, with paired McNemar tests.
#
# ```bash
# python experiments/sonet/small.py                              # run or resume every cell
# python experiments/sonet/small.py --cell spsa                  # one cell
# python experiments/sonet/small.py list                         # grid and status
# python -m jaxdefense report experiments/sonet/results/small    # report.md only
# python experiments/sonet/small.py --quick                      # smoke run
# # CIFAR-10 (GPU): jaxdefense train --config sonet_cifar10:sonet --workdir runs/sonet
# ```
