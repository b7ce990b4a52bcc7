"""Gradient-masking diagnostics, in the spirit of AutoAttack's checks.

A defence whose robustness comes from broken gradients (quantised inputs, adaptive
solvers, randomness) shows tell-tale signs (Athalye et al. 2018; Carlini et al. 2019;
Croce & Hein 2020).  :func:`diagnose` measures each one and reports its numbers:

1. ``randomness``: outputs change across noise keys (attack with EOT, report the EOT
   numbers);
2. ``black_box_stronger``: the gradient-free SPSA attack beats white-box PGD;
3. ``transfer_stronger``: a transfer attack from a surrogate beats white-box PGD;
4. ``not_monotone_in_eps``: accuracy rises as eps grows;
5. ``large_eps_accuracy``: accuracy stays well above 0 at a very large eps;
6. ``bad_gradients``: a large fraction of zero or non-finite input gradients;
7. ``one_step_stronger``: single-step FGSM beats iterative PGD.

Checks 1 is informative (a randomised model is not masked by itself, but must be
attacked with EOT); checks 2 to 7 flag masking.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense import _checks
from jaxdefense import attacks as _attacks
from jaxdefense import data as _data
from jaxdefense.evaluation._robustness import (_check_data, _curve, _evaluate, as_model,
                                               parse_attack, parse_suite)
from jaxdefense._table import format_table

Array = jax.Array


@dataclasses.dataclass
class Check:
  """One gradient-masking diagnostic of :func:`diagnose`.

  Attributes:
    name: the check (e.g. ``"increasing_eps"``, ``"transfer"``, ``"spsa"``).
    flagged: whether the check points at gradient masking.
    detail: one sentence with what was measured.
    numbers: the measured values behind the verdict (accuracies, radii...).
  """
  name: str
  flagged: bool
  detail: str
  numbers: dict[str, Any]


@dataclasses.dataclass
class Diagnosis:
  """The result of :func:`diagnose`: every :class:`Check`, and the overall verdict.

  Attributes:
    checks: the checks in the order they ran.

  ``masked`` is True when any masking check flags (the informational ``randomness``
  check does not count); ``flagged()`` lists the flagged names; ``to_text()`` /
  ``to_json()`` render the table; ``d["name"]`` returns one check (``KeyError`` for an
  unknown name).
  """
  checks: list[Check]

  @property
  def masked(self) -> bool:
    return bool(self._masking())

  def flagged(self) -> list[str]:
    """Names of the flagged checks (``randomness`` included: it is informational)."""
    return [c.name for c in self.checks if c.flagged]

  def _masking(self) -> list[str]:
    """The flagged checks that point at gradient masking (all but ``randomness``)."""
    return [n for n in self.flagged() if n != "randomness"]

  def __getitem__(self, name: str) -> Check:
    for c in self.checks:
      if c.name == name:
        return c
    raise KeyError(f"no check named {name!r}; checks: {[c.name for c in self.checks]}.")

  def to_text(self) -> str:
    rows = [{"check": c.name, "verdict": "FLAG" if c.flagged else "ok", "detail": c.detail}
            for c in self.checks]
    verdict = ("gradient masking suspected: " + ", ".join(self._masking()) if self.masked
               else "no sign of gradient masking")
    return format_table(rows, ["check", "verdict", "detail"], title=verdict)

  def to_json(self) -> dict[str, Any]:
    return {"masked": self.masked,
            "checks": [dataclasses.asdict(c) for c in self.checks]}


def diagnose(logits_fn: Any, images: Any, labels: Any, *, key: Array, eps: float,
             stochastic: bool = False, eot_samples: int = 5,
             surrogate_fn: Callable | None = None, pgd_steps: int = 20,
             spsa_steps: int = 50, spsa_samples: int = 64, large_eps: float = 0.5,
             margin: float = 0.05, batch_size: int = 128, progress: bool = False) -> Diagnosis:
  """Run the gradient-masking checks on a model and a batch of examples.

  Every batched measurement runs through ``jaxdefense.data.run_batches``.

  Args:
    logits_fn: a :class:`~jaxdefense.models.ModelFn` (its ``stochastic`` flag counts),
      or a plain ``f(x) -> logits`` (``f(x, key)`` with ``stochastic=True``).
    images: ``[N, H, W, C]`` in [0, 1]; a few hundred examples are enough.
    labels: ``[N]`` integer labels.
    key: PRNG key.
    eps: the threat model's l-inf radius.
    stochastic: a plain ``logits_fn`` draws noise (attacks then use EOT over
      ``eot_samples``).
    eot_samples: EOT draws.
    surrogate_fn: an optional deterministic surrogate (a ``ModelFn`` or ``g(x) ->
      logits``, e.g. the fixed-step twin of an adaptive ODE net) for the transfer check.
    pgd_steps: PGD iterations of the white-box reference attack.
    spsa_steps, spsa_samples: budget of the gradient-free attack.
    large_eps: the "very large" radius of check 5.
    margin: accuracy difference (fraction) that counts as "stronger" / "rising".
    batch_size: batch size of every compiled call.
    progress: tqdm bars.

  Returns:
    A :class:`Diagnosis`.

  Raises:
    ValueError: bad images, labels or eps (``large_eps`` must exceed ``eps``), a
      stochastic surrogate.
    TypeError: a non-callable model or surrogate.
  """
  model = as_model(logits_fn, stochastic)
  stochastic = model.stochastic
  surrogate = None if surrogate_fn is None else as_model(surrogate_fn)
  if surrogate is not None and surrogate.stochastic:
    raise ValueError("surrogate_fn must be deterministic (the transfer attack uses plain "
                     "PGD on it); got a stochastic ModelFn.")
  x, y = _check_data(np.asarray(images, np.float32), labels)
  _checks.check_eps(eps, "eps")
  _checks.check_eps(large_eps, "large_eps")
  if large_eps <= eps:
    raise ValueError(f"large_eps must exceed eps ({eps}); got {large_eps}.")
  batch_size = _checks.check_int(batch_size, "batch_size", minimum=1)
  ks = jax.random.split(key, 8)
  common = dict(eot_samples=eot_samples, batch_size=batch_size, progress=progress)
  checks: list[Check] = []

  # 1. randomness of the outputs across keys (a deterministic model ignores them)
  xs = jnp.asarray(x[:batch_size])
  first, second = model(xs, ks[0]), model(xs, ks[1])
  spread = float(jnp.max(jnp.abs(first - second)))
  flip = float(jnp.mean(jnp.argmax(first, -1) != jnp.argmax(second, -1)))
  checks.append(Check(
      "randomness", spread > 1e-6,
      (f"outputs vary across keys (max |dlogit| {spread:.3g}, {100 * flip:.1f} % predictions "
       f"flip): attack with EOT{' (done)' if stochastic else ' - NOT done, pass stochastic=True'}")
      if spread > 1e-6 else "outputs are deterministic",
      {"max_logit_change": spread, "prediction_flip_rate": flip}))

  # reference white-box numbers
  rep = _evaluate(model, x, y, key=ks[2], eps=eps,
                  specs=parse_suite(["fgsm", f"pgd:steps={pgd_steps}",
                                     f"spsa:steps={spsa_steps},num_samples={spsa_samples}"]),
                  **common)
  acc_fgsm, acc_pgd, acc_spsa = list(rep.attacks.values())

  # 2. black-box stronger than white-box
  checks.append(Check(
      "black_box_stronger", acc_spsa < acc_pgd - margin,
      f"SPSA {100 * acc_spsa:.1f} % vs PGD-{pgd_steps} {100 * acc_pgd:.1f} %",
      {"spsa": acc_spsa, "pgd": acc_pgd}))

  # 3. transfer stronger than white-box
  if surrogate is not None:
    # The target classifies as in the white-box number it is compared with: a stochastic
    # model with one fresh noise draw (not the EOT average, which votes over draws).
    def transfer_correct(batch, kb):
      xb, yb = batch
      k_attack, k_classify = jax.random.split(kb)
      x_adv = _attacks.pgd(surrogate, xb, yb, key=k_attack, eps=eps, steps=pgd_steps)
      return jnp.argmax(model(x_adv, k_classify), -1) == yb
    acc_transfer = float(np.mean(_data.run_batches(
        transfer_correct, (x, y), batch_size=batch_size, key=ks[3], progress=progress,
        desc="transfer")))
    checks.append(Check(
        "transfer_stronger", acc_transfer < acc_pgd - margin,
        f"transfer PGD {100 * acc_transfer:.1f} % vs white-box PGD {100 * acc_pgd:.1f} %",
        {"transfer": acc_transfer, "pgd": acc_pgd}))

  # 4. accuracy must not rise with eps; 5. and must reach ~0 at a very large eps
  # increasing radii up to large_eps (2 eps is capped there, so it never exceeds 1)
  radii = sorted({eps / 2, eps, min(2 * eps, large_eps), large_eps})
  curve = _curve(model, x, y, key=ks[4], eps_values=radii,
                 spec=parse_attack(f"pgd:steps={pgd_steps}"), **common)
  accs = [a for _, a in curve]
  rises = max((accs[i + 1] - accs[i] for i in range(len(accs) - 1)), default=0.0)
  checks.append(Check(
      "not_monotone_in_eps", rises > margin,
      "PGD accuracy at eps " + ", ".join(f"{r:.3g}: {100 * a:.1f} %"
                                         for r, a in zip(radii, accs)),
      {"eps": radii, "accuracy": accs}))
  num_classes = int(first.shape[-1])
  limit = max(0.1, 1.0 / num_classes + margin)
  checks.append(Check(
      "large_eps_accuracy", accs[-1] > limit,
      f"PGD accuracy {100 * accs[-1]:.1f} % at eps {large_eps:g} (expected <= {100 * limit:.0f} %)",
      {"eps": large_eps, "accuracy": accs[-1]}))

  # 6. zero or non-finite input gradients
  def gradient_flags(batch, kb):
    xb, yb = batch
    loss = lambda z: jnp.sum(_attacks.cross_entropy(model(z, kb), yb))
    flat = jax.grad(loss)(xb).reshape(xb.shape[0], -1)
    return {"zero": jnp.all(flat == 0, axis=1),
            "nonfinite": ~jnp.all(jnp.isfinite(flat), axis=1)}
  flags = _data.run_batches(gradient_flags, (x, y), batch_size=batch_size, key=ks[5],
                            progress=progress, desc="gradients")
  frac_zero = float(np.mean(flags["zero"]))
  frac_bad = float(np.mean(flags["nonfinite"]))
  checks.append(Check(
      "bad_gradients", frac_zero > 0.1 or frac_bad > 0,
      f"{100 * frac_zero:.1f} % of examples have an all-zero input gradient, "
      f"{100 * frac_bad:.1f} % a non-finite one",
      {"zero_fraction": frac_zero, "nonfinite_fraction": frac_bad}))

  # 7. one step stronger than iterative
  checks.append(Check(
      "one_step_stronger", acc_fgsm < acc_pgd - margin,
      f"FGSM {100 * acc_fgsm:.1f} % vs PGD-{pgd_steps} {100 * acc_pgd:.1f} %",
      {"fgsm": acc_fgsm, "pgd": acc_pgd}))
  return Diagnosis(checks)


__all__ = ["Check", "Diagnosis", "diagnose"]
