"""Adversarial attacks as pure functions of ``(logits_fn, x, y, *, key, eps, ...)``.

>>> x_adv = pgd(logits_fn, x, y, key=key, eps=8/255, step_size=2/255, steps=20)

``logits_fn`` maps images ``[B, H, W, C]`` in [0, 1] to logits ``[B, K]``.  A stochastic
model ``f(x, key)`` is passed as ``eot(f, n)``: the attack then averages its gradient over
``n`` noise draws, with fresh keys derived from the attack's ``key`` every iteration.

Every attack

* returns images inside the eps-ball around ``x`` and inside [0, 1] (``eps = 0``
  returns ``x``), also when the model misbehaves (next point);
* checks every loss, logits and gradient it evaluates, per example and inside the
  compiled loop (no host sync): an example that meets a NaN or inf stops at the
  iterate where it happened (finite, inside the ball and [0, 1]); a point where the
  model's logits are not finite never counts as a success.  When the call is not
  traced (not inside ``jit`` / ``vmap``), the attack then raises a ``ValueError``
  naming itself and how many (and which) examples were hit, since their result is no
  adversarial example; traced, nothing can be raised and the stopped examples are
  returned;
* runs its iterations in one ``jax.lax.fori_loop`` (compile time does not depend on the
  step count) and is ``jit``-, ``vmap``- and batch-friendly: static arguments (steps,
  norm, restarts, sample counts) are Python values, ``eps`` and step sizes may be traced
  and may be per example (``[B]``);
* is deterministic for a given ``key``;
* takes float32 (or float64) images; the model may compute in lower precision
  (bfloat16 / float16 logits are upcast, losses are float32), but float16 and
  bfloat16 *images* are rejected;
* validates its arguments before tracing and raises a ``ValueError`` / ``TypeError``
  naming the argument, its value and what was expected.

Compiled once: each attack checks its arguments in Python, then runs one ``jax.jit``
cached on what really changes: the model's structure (the arrays of a
:class:`~jaxdefense.models.ModelFn`, of a ``functools.partial`` or inside an
:class:`EOT` are traced arguments; a plain function counts by identity), the static
hyper-parameters (steps, norm, restarts, loss, ...) and the shapes.  ``eps``, step
sizes, learning rates and other float hyper-parameters are traced, so
``for eps in sweep: pgd(model, x, y, key=key, eps=eps)`` compiles once, and so does
attacking batch after batch, or a model whose variables change (``models.bind``).  A
new ``lambda`` per call is a new function and compiles again: build it once.  The
cache keeps the functions it was keyed on alive (JAX's jit cache, until
``jax.clear_caches()``).  Called
inside the caller's ``jax.jit`` / ``vmap``, the attack is traced into that program as
before.

Threat models: l-inf everywhere; l2 for :func:`pgd`, :func:`apgd` and :func:`cw_l2`.
Targeted variants take ``target=`` labels.  The building blocks (losses, projections,
ascent rules and the loop driver) are exported for custom attacks (STYLE.md practice 7).

Layout (private modules, each importing only those listed before it):
``_eot`` (EOT, predict), ``_compiled`` (the compile cache and the non-finite check at
the API boundary), ``_losses`` (CE, margin, DLR, success), ``_projection``
(balls ∩ [0, 1], random starts), ``_setup`` (argument checks and the one set-up every
attack calls), ``_objective`` (loss and gradient at a point), ``_ascent`` (ascent rules,
Adam), ``_loop`` (the ``lax`` loop, restarts); then the attacks ``_gradient``,
``_apgd``, ``_cw``, ``_spsa`` and ``_transfer``.
"""

from jaxdefense.attacks._apgd import APGDState as APGDState
from jaxdefense.attacks._apgd import apgd as apgd
from jaxdefense.attacks._apgd import apgd_rule as apgd_rule
from jaxdefense.attacks._apgd import checkpoints as apgd_checkpoints
from jaxdefense.attacks._ascent import AscentRule as AscentRule
from jaxdefense.attacks._ascent import adam_ascent as adam_ascent
from jaxdefense.attacks._ascent import momentum_sign_ascent as momentum_sign_ascent
from jaxdefense.attacks._ascent import optax_ascent as optax_ascent
from jaxdefense.attacks._ascent import sign_ascent as sign_ascent
from jaxdefense.attacks._eot import EOT as EOT
from jaxdefense.attacks._eot import eot as eot
from jaxdefense.attacks._eot import predict as predict
from jaxdefense.attacks._loop import ascent_loop as ascent_loop
from jaxdefense.attacks._losses import cross_entropy as cross_entropy
from jaxdefense.attacks._losses import dlr as dlr
from jaxdefense.attacks._losses import dlr_targeted as dlr_targeted
from jaxdefense.attacks._losses import make_loss as make_loss
from jaxdefense.attacks._losses import margin as margin
from jaxdefense.attacks._objective import make_value_and_grad as make_value_and_grad
from jaxdefense.attacks._projection import make_projection as make_projection
from jaxdefense.attacks._projection import random_start as random_start
from jaxdefense.attacks._cw import cw_l2 as cw_l2
from jaxdefense.attacks._cw import cw_linf as cw_linf
from jaxdefense.attacks._gradient import fgsm as fgsm
from jaxdefense.attacks._gradient import ifgsm as ifgsm
from jaxdefense.attacks._gradient import mifgsm as mifgsm
from jaxdefense.attacks._gradient import pgd as pgd
from jaxdefense.attacks._spsa import spsa as spsa
from jaxdefense.attacks._spsa import spsa_gradient as spsa_gradient
from jaxdefense.attacks._transfer import TransferResult as TransferResult
from jaxdefense.attacks._transfer import transfer as transfer

__all__ = [
    "APGDState", "AscentRule", "EOT", "TransferResult", "adam_ascent", "apgd",
    "apgd_checkpoints", "apgd_rule", "ascent_loop", "cross_entropy", "cw_l2", "cw_linf",
    "dlr", "dlr_targeted", "eot", "fgsm", "ifgsm", "make_loss", "make_projection",
    "make_value_and_grad", "margin", "mifgsm", "momentum_sign_ascent", "optax_ascent",
    "pgd", "predict", "random_start", "sign_ascent", "spsa", "spsa_gradient",
    "transfer",
]
