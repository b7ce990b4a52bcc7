"""Residual step rules: ResNets, EnResNets and In-ResNets as discretised flows.

``x_{n+1} = step(x_n, f_n(x_n))`` with ``step`` one of :class:`Euler` (ResNet),
:class:`EulerMaruyama` (EnResNet, noise from ``rngs={"noise": key}``) and
:class:`Damped` (In-ResNet family: stored as the authors' code by default, initial
effective coefficients from :data:`DAMPED_INIT_RANGES`, each damped block's coefficient
sown under :data:`DAMPING_INTERMEDIATE` when ``"intermediates"`` is mutable).  Any model
of :mod:`jaxdefense.models` takes any step rule through its ``step`` field.
"""

from jaxdefense.dynamics._steps import DAMPED_INIT_RANGES as DAMPED_INIT_RANGES
from jaxdefense.dynamics._steps import DAMPING_INTERMEDIATE as DAMPING_INTERMEDIATE
from jaxdefense.dynamics._steps import Damped as Damped
from jaxdefense.dynamics._steps import Euler as Euler
from jaxdefense.dynamics._steps import EulerMaruyama as EulerMaruyama
from jaxdefense.dynamics._steps import StepContext as StepContext
from jaxdefense.dynamics._steps import apply_step as apply_step
from jaxdefense.dynamics._steps import is_stochastic as is_stochastic
from jaxdefense.dynamics._encoding import STEP_RULES as STEP_RULES
from jaxdefense.dynamics._encoding import step_from_dict as step_from_dict
from jaxdefense.dynamics._encoding import step_name as step_name
from jaxdefense.dynamics._encoding import step_to_dict as step_to_dict

__all__ = ["DAMPED_INIT_RANGES", "DAMPING_INTERMEDIATE", "Damped", "Euler", "EulerMaruyama",
           "StepContext", "apply_step", "is_stochastic", "STEP_RULES", "step_from_dict",
           "step_name", "step_to_dict"]

from jaxdefense.dynamics._continuous import ADJOINTS as ADJOINTS
from jaxdefense.dynamics._continuous import ODE_STATS as ODE_STATS
from jaxdefense.dynamics._continuous import DEFAULT_CHECKPOINTS as DEFAULT_CHECKPOINTS
from jaxdefense.dynamics._noise import SAMPLERS as SAMPLERS
from jaxdefense.dynamics._noise import fast_normal as fast_normal
from jaxdefense.dynamics._noise import fast_rademacher as fast_rademacher
from jaxdefense.dynamics._continuous import ODEBlock as ODEBlock
from jaxdefense.dynamics._continuous import RK4 as RK4
from jaxdefense.dynamics._continuous import ode_stats as ode_stats
from jaxdefense.dynamics._continuous import SDEBlock as SDEBlock
from jaxdefense.dynamics._continuous import SOLVERS as SOLVERS
from jaxdefense.dynamics._continuous import UnrolledSolution as UnrolledSolution
from jaxdefense.dynamics._continuous import feynman_kac as feynman_kac
from jaxdefense.dynamics._continuous import solve_ode as solve_ode
from jaxdefense.dynamics._continuous import solve_sde as solve_sde
from jaxdefense.dynamics._spectral import dealias_mask as dealias_mask
from jaxdefense.dynamics._spectral import grid as grid
from jaxdefense.dynamics._spectral import solve_convection_diffusion as solve_convection_diffusion
from jaxdefense.dynamics._spectral import wavenumbers as wavenumbers

__all__ += ["ADJOINTS", "DEFAULT_CHECKPOINTS", "SAMPLERS", "fast_normal", "fast_rademacher", "ODE_STATS", "ODEBlock", "RK4", "ode_stats", "SDEBlock", "SOLVERS", "UnrolledSolution", "feynman_kac", "solve_ode", "solve_sde",
            "dealias_mask", "grid", "solve_convection_diffusion", "wavenumbers"]
