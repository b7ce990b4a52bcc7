"""Analysis tools: learned damping, loss landscapes, Jacobian / Lyapunov spectra.

* :func:`damping_coefficients`: the effective coefficient ``lambda`` of every damped
  block (:class:`~jaxdefense.dynamics.Damped`), per block, whatever the storage.
* :func:`loss_landscape`: the cross-entropy surface of any model of the zoo (a
  :class:`~jaxdefense.models.ModelFn`) on a grid spanned by the FGSM direction and a
  random orthogonal sign direction, in units of 1/255, with the predicted-class map
  (the In-ResNet paper's Fig. 2).
* :func:`jacobian_spectrum`: per-block singular values of the Jacobians of the residual
  branches and of the whole blocks, of the whole feature map, the product bound and a
  finite-time Lyapunov exponent, matrix-free (``jax.linearize`` / transpose and subspace
  power iteration, ``vmap`` over examples).
* :func:`plot_loss_landscape`, :func:`plot_spectra`: the figures (matplotlib, imported
  when called).

The analysis floor sits above ``training`` and below ``evaluation``.
"""

from jaxdefense.analysis._damping import DampingCoefficient as DampingCoefficient
from jaxdefense.analysis._damping import damping_coefficients as damping_coefficients
from jaxdefense.analysis._landscape import LossLandscape as LossLandscape
from jaxdefense.analysis._landscape import loss_landscape as loss_landscape
from jaxdefense.analysis._spectrum import JacobianSpectrum as JacobianSpectrum
from jaxdefense.analysis._spectrum import jacobian_spectrum as jacobian_spectrum
from jaxdefense.analysis._plots import plot_loss_landscape as plot_loss_landscape
from jaxdefense.analysis._plots import plot_spectra as plot_spectra

__all__ = ["DampingCoefficient", "JacobianSpectrum", "LossLandscape", "damping_coefficients",
           "jacobian_spectrum",
           "loss_landscape", "plot_loss_landscape", "plot_spectra"]
