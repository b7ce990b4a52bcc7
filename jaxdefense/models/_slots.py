"""Where a model takes LAD's additive perturbations: after each block, and optionally
at the stem output.

A model with ``L`` residual (or ODE) blocks takes ``perturbations`` as a sequence of
``L`` entries, each added to one block's output (``x_{n+1} += delta_n``), or of ``L + 1``
entries whose first is added to the stem output ``x_0`` (the input of the first block)
and the others to the blocks' outputs.  ``None`` entries add nothing.  With
``capture_states=True`` the model returns the values at its slots: the ``L`` block
outputs, preceded by ``x_0`` when ``L + 1`` perturbations were given.  This is what
both splittings of LAD need (:class:`jaxdefense.objectives.LAD`): Lie–Trotter perturbs
the block outputs, Strang–Marchuk also the stem output.
"""

from __future__ import annotations

from typing import Any, Sequence


def split_perturbations(perturbations: Sequence[Any] | None, num_blocks: int,
                        owner: str) -> tuple[bool, Any, Sequence[Any] | None]:
  """``(with_stem, stem_delta, block_deltas)`` from a model's ``perturbations``.

  Raises:
    ValueError: a sequence of another length than ``num_blocks`` or ``num_blocks + 1``.
  """
  if perturbations is None:
    return False, None, None
  n = len(perturbations)
  if n == num_blocks:
    return False, None, perturbations
  if n == num_blocks + 1:
    return True, perturbations[0], perturbations[1:]
  raise ValueError(f"{owner}: perturbations must have one entry per block ({num_blocks}), "
                   f"or one more for the stem output ({num_blocks + 1}); got {n}.")


def add(x: Any, delta: Any) -> Any:
  """``x + delta`` (``None`` adds nothing)."""
  if delta is None:
    return x
  from jaxdefense.nn import _layers as L
  return L.add(x, delta)
