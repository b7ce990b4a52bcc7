"""Certification by abstract interpretation: ``Box`` and ``HybridZonotope`` pytrees.

Any model built from :mod:`jaxdefense.nn` layers runs on an abstract value as on an
array, so the zoo needs no second definition for certification::

  lo, hi = jd.certify.bounds(model, variables, x, eps, domain="box")      # [B, K] each
  ok = jd.certify.verify(model, variables, x, y, eps, domain="zonotope")  # bool [B]

Domains: :class:`Box` (interval bound propagation) and :class:`HybridZonotope`
(DiffAI; centre, box radius and a static number of correlated generators, with the
DiffAI box ReLU or the DeepZ minimal-area ReLU).  Both are pytrees, every transformer
is differentiable, and the abstract layers of :mod:`jaxdefense.nn` (``CorrelateMaxK``,
``DecorrelateMinK``, ...) tune the zonotope's precision.

Reference: Mirman, Singh & Vechev, "A Provable Defense for Deep Residual Networks"
(2019); Mirman, Gehr & Vechev, "Differentiable Abstract Interpretation for Provably
Robust Neural Networks" (ICML 2018); Singh et al., "Fast and Effective Robustness
Certification" (DeepZ, NeurIPS 2018).
"""

from jaxdefense.certify._api import DOMAINS as DOMAINS
from jaxdefense.certify._api import abstract_logits as abstract_logits
from jaxdefense.certify._api import bounds as bounds
from jaxdefense.certify._api import certified_margins as certified_margins
from jaxdefense.certify._api import count_neurons as count_neurons
from jaxdefense.certify._api import input_set as input_set
from jaxdefense.certify._api import make_bounds_fn as make_bounds_fn
from jaxdefense.certify._api import prepare as prepare
from jaxdefense.certify._api import report as report
from jaxdefense.certify._api import verify as verify
from jaxdefense.certify._domains import Box as Box
from jaxdefense.certify._domains import HybridZonotope as HybridZonotope
from jaxdefense.certify._domains import linear_bounds as linear_bounds
from jaxdefense.certify._domains import margin_lower_bounds as margin_lower_bounds
from jaxdefense.certify._domains import worst_case_logits as worst_case_logits

__all__ = [
    "Box",
    "DOMAINS",
    "HybridZonotope",
    "abstract_logits",
    "bounds",
    "certified_margins",
    "count_neurons",
    "input_set",
    "linear_bounds",
    "make_bounds_fn",
    "margin_lower_bounds",
    "prepare",
    "report",
    "verify",
    "worst_case_logits",
]
