"""Transfer ("blind") attacks: craft on an oracle model, evaluate on a target model."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax

from jaxdefense.attacks._eot import predict

Array = jax.Array


class TransferResult(NamedTuple):
  """Outcome of :func:`transfer`.

  Attributes:
    x_adv: adversarial images crafted on the oracle, ``[B, H, W, C]``.
    oracle_logits: the oracle's logits on ``x_adv`` (white-box result), ``[B, K]``.
    target_logits: the target model's logits on ``x_adv`` (blind result), ``[B, K']``.
  """

  x_adv: Array
  oracle_logits: Array
  target_logits: Array


def transfer(attack: Callable, oracle_fn: Callable, target_fn: Callable, x: Array,
             y: Array, *, key: Optional[Array] = None, **attack_kwargs: Any) -> TransferResult:
  """Blind (transfer) attack: run ``attack`` on ``oracle_fn``, classify with ``target_fn``.

  The target model is never queried while crafting.  EnResNet's blind evaluation
  (Table 2) crafts FGSM / IFGSM-20 / C&W examples on an oracle ResNet and reports the
  accuracy of the target model on them.

  Args:
    attack: any attack of this module, e.g. ``jaxdefense.attacks.ifgsm``.
    oracle_fn: the model attacked, ``f(x) -> logits`` or ``eot(f, n)``.
    target_fn: the model evaluated, ``g(x) -> logits`` or ``eot(g, n)``.
    x: clean images ``[B, H, W, C]`` in [0, 1].
    y: integer labels ``[B]``.
    key: PRNG key, split between the attack and the evaluations (required by
      randomised attacks and stochastic models).
    **attack_kwargs: forwarded to ``attack`` (``eps``, ``steps``, ...).

  Returns:
    A :class:`TransferResult` ``(x_adv, oracle_logits, target_logits)``.

  Raises:
    TypeError: ``attack`` or ``target_fn`` is not callable; errors of ``attack``
      (including its ``ValueError`` for a model with non-finite logits or gradients).
  """
  if not callable(attack):
    raise TypeError(f"transfer: attack must be an attack function; got {attack!r}.")
  if not callable(target_fn):
    raise TypeError(f"transfer: target_fn must be callable f(x) -> logits; got {target_fn!r}.")
  if key is None:
    k_attack = k_oracle = k_target = None
  else:
    k_attack, k_oracle, k_target = jax.random.split(key, 3)
  x_adv = attack(oracle_fn, x, y, key=k_attack, **attack_kwargs)
  return TransferResult(x_adv, predict(oracle_fn, x_adv, key=k_oracle),
                        predict(target_fn, x_adv, key=k_target))
