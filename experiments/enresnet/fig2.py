"""EnResNet, Fig. 2: diffusion regularises the level sets of the transport solution.

Wang, Yuan, Shi & Osher (2019), Sec. 2.1–2.2: a ResNet computes ``u(x, 0)`` of the
transport equation ``u_t + F . grad u = 0``, ``u(., 1) = f``; adding diffusion gives
the convection–diffusion equation (their Eq. 8)

    u_t + F . grad u + (sigma^2 / 2) Laplace u = 0,   u(x, 1) = f(x),

whose ``t = 0`` solution is what an ensemble of noisy ResNets approximates
(Feynman–Kac).  The paper solves it on the periodic unit square with a pseudo-spectral
method (``h = 1/128``, ``dt = 1e-3``) for sigma = 0, 0.01, 0.1, with a random velocity
and a random terminal condition, and shows level sets of ``u(., 0)`` becoming more
regular as sigma grows.

What we do (``jaxdefense.dynamics.solve_convection_diffusion``, IFRK4 + 2/3 de-aliasing):
reversing time (``s = 1 - t``) turns Eq. 8 into the forward problem
``w_s + (-F) . grad w = (sigma^2/2) Laplace w``, ``w(., 0) = f``, so
``u(., 0) = w(., 1)``: we integrate it over ``[0, 1]`` in 1000 steps on a 128 x 128 grid.

Choices the text leaves open (documented, see ``--velocity``):

* velocity: the paper samples "a random number uniformly from -1 to 1 at each grid
  point".  Taken literally on the 128 x 128 grid this field has gradients ~ 100, its
  compressive part sharpens ``u`` below the grid scale within t ~ 0.05, and the
  (non-dissipative, sigma = 0) spectral scheme blows up - no resolved solution exists.
  Default ``coarse``: each component sampled uniformly in [-1, 1] on a coarse
  ``M x M`` mesh of the unit square (``--mesh``, 8), trigonometrically interpolated to
  the grid and rescaled so that ``max |F_i| = 1``.  Alternative ``divfree``: a
  divergence-free field ``F = grad^perp psi`` with ``psi`` sampled the same way
  (L2-stable for any sigma, stronger filamentation).
* terminal condition ``f``: a smooth random field (uniform samples on a coarse
  ``--f-mesh`` mesh, 6, trigonometrically interpolated) rescaled to [0, 1], like a
  class probability.

Run: ``python experiments/enresnet/fig2.py`` (about 10-30 s on a 2-core CPU) writes
``experiments/enresnet/results/fig2_convection_diffusion.png``.
"""

from __future__ import annotations

import argparse
import os
import time

import jax.numpy as jnp
import numpy as np

from jaxdefense.dynamics import solve_convection_diffusion, wavenumbers

HERE = os.path.dirname(os.path.abspath(__file__))
SIGMAS = (0.0, 0.01, 0.1)


def trig_interpolate(coarse: np.ndarray, n: int) -> np.ndarray:
  """Band-limited (trigonometric) interpolation of periodic samples ``[..., m, m]`` to
  ``[..., n, n]`` (the Nyquist mode of an even ``m`` is dropped to keep it real)."""
  m = coarse.shape[-1]
  ch = np.fft.fft2(coarse)
  freqs = np.rint(np.fft.fftfreq(m, 1.0 / m)).astype(int)
  keep = np.abs(freqs) < m / 2
  src, dst = np.nonzero(keep)[0], freqs[keep] % n
  out = np.zeros(coarse.shape[:-2] + (n, n), complex)
  out[..., dst[:, None], dst[None, :]] = ch[..., src[:, None], src[None, :]]
  return np.real(np.fft.ifft2(out)) * (n * n) / (m * m)


def velocity_field(rng: np.random.Generator, n: int, mesh: int, kind: str) -> np.ndarray:
  """Random velocity ``F`` of shape ``(2, n, n)`` with ``max |F_i| = 1``."""
  if kind == "coarse":
    v = trig_interpolate(rng.uniform(-1.0, 1.0, (2, mesh, mesh)), n)
  elif kind == "divfree":
    psi = trig_interpolate(rng.uniform(-1.0, 1.0, (mesh, mesh)), n)
    kx, ky = (np.asarray(k) for k in wavenumbers(n))
    ph = np.fft.fft2(psi)
    v = np.stack([np.real(np.fft.ifft2(1j * ky * ph)), -np.real(np.fft.ifft2(1j * kx * ph))])
  else:  # "pointwise": the literal reading (unstable at sigma = 0, see module docstring)
    v = rng.uniform(-1.0, 1.0, (2, n, n))
  return (v / np.abs(v).max()).astype(np.float32)


def terminal_condition(rng: np.random.Generator, n: int, mesh: int) -> np.ndarray:
  """Smooth random ``f`` of shape ``(n, n)`` with values in [0, 1]."""
  f = trig_interpolate(rng.uniform(0.0, 1.0, (mesh, mesh)), n)
  return ((f - f.min()) / (f.max() - f.min())).astype(np.float32)


def solve_backward(f: np.ndarray, F: np.ndarray, sigma: float, n_steps: int) -> np.ndarray:
  """``u(., 0)`` of ``u_t + F . grad u + (sigma^2/2) Laplace u = 0``, ``u(., 1) = f``."""
  u = solve_convection_diffusion(jnp.asarray(f), -jnp.asarray(F), sigma, 1.0, n_steps)
  return np.asarray(u)


def total_variation(u: np.ndarray) -> float:
  """Discrete periodic total variation ``sum |D_x u| + |D_y u|`` times ``h``."""
  tv = (np.abs(np.diff(u, axis=0, append=u[:1])).sum()
        + np.abs(np.diff(u, axis=1, append=u[:, :1])).sum())
  return float(tv) / u.shape[0]


def plot(f: np.ndarray, sols: dict[float, np.ndarray], path: str, levels: int) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = f.shape[0]
  s = np.arange(n) / n
  panels = [(f"({'abc'[i]}) $\\sigma$ = {sg:g}", sols[sg]) for i, sg in enumerate(SIGMAS)]
  panels.append(("(d) $u(x, 1)$", f))
  lv = np.linspace(0.0, 1.0, levels + 2)[1:-1]
  fig, axes = plt.subplots(1, 4, figsize=(16, 4.3), constrained_layout=True)
  for ax, (title, u) in zip(axes, panels):
    # u[i, j] = u(x = i h, y = j h): transpose so x runs horizontally.
    ax.imshow(u.T, origin="lower", extent=(0, 1, 0, 1), cmap="coolwarm", vmin=0, vmax=1,
              alpha=0.45, interpolation="bilinear")
    ax.contour(s, s, u.T, levels=lv, colors="k", linewidths=0.7)
    ax.set_title(title)
    ax.set_xticks([0, 0.5, 1])
    ax.set_yticks([0, 0.5, 1])
    ax.set_aspect("equal")
  fig.suptitle("Level sets of $u(x,0)$ for $u_t + F\\cdot\\nabla u + \\frac{\\sigma^2}{2}"
               "\\Delta u = 0$, $u(x,1)=f$ (periodic unit square, pseudo-spectral)")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=128, help="grid size (h = 1/n)")
  p.add_argument("--n-steps", type=int, default=1000, help="time steps on [0, 1]")
  p.add_argument("--velocity", choices=("coarse", "divfree", "pointwise"), default="coarse")
  p.add_argument("--mesh", type=int, default=8, help="coarse mesh of the random velocity")
  p.add_argument("--f-mesh", type=int, default=6, help="coarse mesh of the random f")
  p.add_argument("--levels", type=int, default=9, help="number of level sets drawn")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(HERE, "results",
                                               "fig2_convection_diffusion.png"))
  args = p.parse_args(argv)

  rng = np.random.default_rng(args.seed)
  F = velocity_field(rng, args.n, args.mesh, args.velocity)
  f = terminal_condition(rng, args.n, args.f_mesh)
  sols = {}
  for sigma in SIGMAS:
    t = time.perf_counter()
    u = solve_backward(f, F, sigma, args.n_steps)
    print(f"sigma={sigma:<5g} range [{u.min():+.3f}, {u.max():+.3f}]  mean {u.mean():.4f}  "
          f"total variation {total_variation(u):8.2f}  ({time.perf_counter() - t:.1f} s)")
    sols[sigma] = u
  print(f"f: range [{f.min():.3f}, {f.max():.3f}], mean {f.mean():.4f}, total variation "
        f"{total_variation(f):.2f}")
  plot(f, sols, args.out, args.levels)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
