"""Evaluation: clean / robust / corruption / certified accuracy tables and diagnostics.

>>> report = evaluate_robustness(logits_fn, x, y, key=key, eps=8/255, suite="quick",
...                              corruptions="noise")   # the four noise corruptions
>>> print(report.to_text())
>>> ensemble = restore_ensemble(["runs/seed0", "runs/seed1"])  # logits averaged over runs
>>> print(diagnose(logits_fn, x, y, key=key, eps=8/255).to_text())
"""

from jaxdefense.evaluation._certified import certified_accuracy as certified_accuracy
from jaxdefense.evaluation._diagnose import Check as Check
from jaxdefense.evaluation._diagnose import Diagnosis as Diagnosis
from jaxdefense.evaluation._diagnose import diagnose as diagnose
from jaxdefense.evaluation._ensemble import restore_ensemble as restore_ensemble
from jaxdefense.evaluation._robustness import ATTACKS as ATTACKS
from jaxdefense.evaluation._robustness import CORRUPTION_PRESETS as CORRUPTION_PRESETS
from jaxdefense.evaluation._robustness import INRESNET_RADII as INRESNET_RADII
from jaxdefense.evaluation._robustness import SUITES as SUITES
from jaxdefense.evaluation._robustness import AttackSpec as AttackSpec
from jaxdefense.evaluation._robustness import RobustnessReport as RobustnessReport
from jaxdefense.evaluation._robustness import accuracy_vs_eps as accuracy_vs_eps
from jaxdefense.evaluation._robustness import evaluate_robustness as evaluate_robustness
from jaxdefense.evaluation._robustness import parse_attack as parse_attack
from jaxdefense.evaluation._robustness import parse_suite as parse_suite
from jaxdefense.evaluation._robustness import plot_accuracy_vs_eps as plot_accuracy_vs_eps
from jaxdefense.evaluation._run import evaluate_run as evaluate_run
from jaxdefense.evaluation._run import run_logits_fn as run_logits_fn
from jaxdefense.evaluation._stats import Comparison as Comparison
from jaxdefense.evaluation._stats import Estimate as Estimate
from jaxdefense.evaluation._stats import binomial_se as binomial_se
from jaxdefense.evaluation._stats import compare as compare
from jaxdefense.evaluation._stats import estimate as estimate
from jaxdefense.evaluation._stats import mcnemar as mcnemar
from jaxdefense.evaluation._stats import two_proportion_z as two_proportion_z
from jaxdefense.evaluation._stats import welch_t as welch_t
from jaxdefense.evaluation._study import Cell as Cell
from jaxdefense.evaluation._study import CellContext as CellContext
from jaxdefense.evaluation._study import Results as Results
from jaxdefense.evaluation._study import Study as Study
from jaxdefense.evaluation._study import load_results as load_results
from jaxdefense.evaluation._study import markdown_table as markdown_table
from jaxdefense.evaluation._study import render_report as render_report
from jaxdefense.evaluation._study import run_study as run_study
from jaxdefense.evaluation._study import main as study_main
from jaxdefense.evaluation._study import write_report as write_report

__all__ = ["ATTACKS", "CORRUPTION_PRESETS", "INRESNET_RADII", "SUITES", "AttackSpec", "Check",
           "Diagnosis", "RobustnessReport", "accuracy_vs_eps", "certified_accuracy",
           "diagnose", "evaluate_robustness", "evaluate_run", "restore_ensemble",
           "run_logits_fn", "parse_attack", "parse_suite", "plot_accuracy_vs_eps",
           # the experiment runner and its statistics
           "Cell", "CellContext", "Comparison", "Estimate", "Results", "Study", "binomial_se",
           "compare", "estimate", "load_results", "markdown_table", "mcnemar", "render_report",
           "run_study", "study_main", "two_proportion_z", "welch_t", "write_report"]
