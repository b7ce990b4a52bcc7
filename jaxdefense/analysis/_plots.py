"""Figures of the analysis tools: loss landscapes and per-block Jacobian spectra.

matplotlib is imported when a function is called (it is not needed otherwise); the
figures are drawn on a ``matplotlib.figure.Figure`` without ``pyplot``, so they need no
display, touch no global figure state and work under any backend.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from jaxdefense import _checks
from jaxdefense.analysis._landscape import LossLandscape
from jaxdefense.analysis._spectrum import JacobianSpectrum

__all__ = ["plot_loss_landscape", "plot_spectra"]

_WHICH = ("block", "residual")


def _check_path(path: Any) -> str:
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"path must be a file path (str or os.PathLike); got "
                    f"{_checks._summary(path)}.")
  path = os.fspath(path)
  folder = os.path.dirname(path)
  if folder:
    os.makedirs(folder, exist_ok=True)
  return path


def plot_loss_landscape(landscape: LossLandscape, path: Any, *, index: int = 0,
                        title: str | None = None,
                        class_names: Any = None, dpi: int = 120) -> str:
  """Draw a loss landscape as the In-ResNet paper's Fig. 2 and save it.

  Left: the loss surface in 3-D over the grid (FGSM direction x random orthogonal
  direction, units of 1/255).  Right: the predicted class at every grid point (one colour
  per class, the clean image marked at the centre, the true label in the legend).

  Args:
    landscape: a :class:`~jaxdefense.analysis.LossLandscape` of one image or a batch.
    path: the image file to write (the format follows the suffix: ``.png``, ``.pdf``,
      ``.svg``); missing folders are created.
    index: the image of a batch landscape to draw (ignored for one image); default 0.
    title: figure title; default none.
    class_names: names of the classes (indexable by class id) for the legend; default
      the ids.
    dpi: resolution of raster formats; default 120.

  Returns:
    ``path`` as a string.

  Raises:
    TypeError: ``landscape`` is not a ``LossLandscape``; ``path`` not a path; ``index``
      not an integer.
    ValueError: ``index`` out of range.
  """
  if not isinstance(landscape, LossLandscape):
    raise TypeError(f"landscape must be a LossLandscape (analysis.loss_landscape(...)); "
                    f"got {_checks._summary(landscape)}.")
  path = _check_path(path)
  loss, pred, label = landscape.loss, landscape.pred, landscape.label
  if loss.ndim == 3:
    index = _checks.check_int(index, "index", minimum=0, maximum=loss.shape[0] - 1)
    loss, pred, label = loss[index], pred[index], label[index]
  from matplotlib import colors as mcolors
  from matplotlib.figure import Figure
  from matplotlib.patches import Patch

  c = landscape.coords
  a, b = np.meshgrid(c, c, indexing="ij")   # a: FGSM axis (rows), b: random axis
  fig = Figure(figsize=(11, 4.6))
  ax = fig.add_subplot(1, 2, 1, projection="3d")
  ax.plot_surface(a, b, loss, cmap="viridis", linewidth=0, antialiased=True)
  ax.set_xlabel("FGSM direction (1/255)")
  ax.set_ylabel("random direction (1/255)")
  ax.set_zlabel("cross-entropy")
  ax.set_title("loss surface")

  ax2 = fig.add_subplot(1, 2, 2)
  classes = np.unique(pred)
  palette = [mcolors.to_rgba(f"C{i % 10}") for i in range(len(classes))]
  codes = np.searchsorted(classes, pred)
  cmap = mcolors.ListedColormap(palette)
  step = float(c[1] - c[0])
  extent = (c[0] - step / 2, c[-1] + step / 2, c[-1] + step / 2, c[0] - step / 2)
  ax2.imshow(codes, cmap=cmap, vmin=-0.5, vmax=len(classes) - 0.5, extent=extent,
             interpolation="nearest", aspect="auto")
  ax2.plot([0.0], [0.0], marker="*", color="black", markersize=12, linestyle="none")
  ax2.set_xlabel("random direction (1/255)")
  ax2.set_ylabel("FGSM direction (1/255)")
  ax2.set_title(f"predicted class (true: {_name(int(label), class_names)})")
  ax2.legend(handles=[Patch(color=palette[i], label=_name(int(cls), class_names))
                      for i, cls in enumerate(classes)],
             loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  return path


def _name(cls: int, class_names: Any) -> str:
  if class_names is None:
    return str(cls)
  try:
    return str(class_names[cls])
  except (IndexError, KeyError, TypeError):
    return str(cls)


def plot_spectra(spectra: Mapping[str, JacobianSpectrum], path: Any, *,
                 which: str = "block", title: str | None = None, log: bool = True,
                 dpi: int = 120) -> str:
  """Per-block largest singular values of several models on one axis, and save it.

  One line per model (e.g. ``{"ResNet": s1, "In-ResNet": s2}``): the mean over examples
  of the largest singular value of each block's Jacobian (``which="block"``, the whole
  block map) or of its residual branch (``which="residual"``) against the block index,
  with a band from the smallest to the largest example; a dotted line marks 1 (no
  stretch).  The legend gives each model's mean finite-time Lyapunov exponent.

  Args:
    spectra: model label -> :class:`~jaxdefense.analysis.JacobianSpectrum` (at least one;
      the models may have different numbers of blocks).
    path: the image file to write (format from the suffix); missing folders are created.
    which: ``"block"`` (default) or ``"residual"``.
    title: axis title; default none.
    log: logarithmic y axis; default ``True``.
    dpi: resolution of raster formats; default 120.

  Returns:
    ``path`` as a string.

  Raises:
    TypeError: ``spectra`` not a mapping of ``JacobianSpectrum``; ``path`` not a path.
    ValueError: an empty ``spectra``; an unknown ``which``.
  """
  if not isinstance(spectra, Mapping):
    raise TypeError(f"spectra must be a mapping label -> JacobianSpectrum; got "
                    f"{_checks._summary(spectra)}.")
  if not spectra:
    raise ValueError("spectra must name at least one model; got an empty mapping.")
  for label, s in spectra.items():
    if not isinstance(s, JacobianSpectrum):
      raise TypeError(f"spectra[{label!r}] must be a JacobianSpectrum "
                      f"(analysis.jacobian_spectrum(...)); got {_checks._summary(s)}.")
  _checks.check_choice(which, "which", _WHICH)
  path = _check_path(path)
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7, 4.2))
  ax = fig.add_subplot(1, 1, 1)
  for i, (label, s) in enumerate(spectra.items()):
    sigma = (s.block_sigma if which == "block" else s.residual_sigma)[:, :, 0]
    idx = np.arange(sigma.shape[1])
    color = f"C{i % 10}"
    ax.plot(idx, sigma.mean(axis=0), marker="o", color=color,
            label=f"{label} (FTLE {float(np.mean(s.lyapunov)):.3g})")
    ax.fill_between(idx, sigma.min(axis=0), sigma.max(axis=0), color=color, alpha=0.2)
  ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
  if log:
    ax.set_yscale("log")
  ax.set_xlabel("residual block")
  ax.set_ylabel("largest singular value of " +
                ("the block Jacobian" if which == "block" else "the residual-branch Jacobian"))
  if title:
    ax.set_title(title)
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  return path
