"""In-ResNet at the paper's scale: CIFAR-10, ResNet-110 and -164 families (GPU runs).

Two studies on the experiment runner, one per depth, with the cells and the report of
the small study (``small.py``), on the config ``experiments/configs/in_resnet_cifar10.py``
(160 epochs, lr drops at 80/120, weight decay 1e-4 on every parameter, the authors'
initial coefficients: U(0.2, 0.25) at 110 layers, U(0.1, 0.2) at 164)::

  python experiments/inresnet/paper.py --depth 110                 # run or resume
  python experiments/inresnet/paper.py --depth 164 --cell inresnet --seed 0
  python experiments/inresnet/paper.py --depth 110 list
  python -m jaxdefense report experiments/inresnet/results/paper110

Depth 110 runs the ResNet and all five damped variants (Tables 1-4); depth 164 the ResNet,
In-ResNet and lambda-In-ResNet (Tables 1-3); 5 seeds each, as the paper's 5 runs.  Evaluation on the 10,000 CIFAR-10 test
images: the noise corruptions from the official CIFAR-10-C files when the environment
variable ``CIFAR10C_DIR`` names their folder (else generated with the CIFAR-10-C
constants, said in the results), FGSM / IFGSM-20 / PGD-20 at 1, 2 and 4 / 255 with step
2/255; the ensembles of Table 6 and the analysis cell as in the small study.  Each
training run takes hours on one GPU: run cells as a job array (``--index``).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import small  # noqa: E402  (the small study's cells, evaluation and report)

import jaxdefense as jd  # noqa: E402
from jaxdefense.evaluation import Cell, Study  # noqa: E402

CONFIG = os.path.join(small.ROOT, "experiments", "configs", "in_resnet_cifar10.py")
INIT = {110: (0.2, 0.25), 164: (0.1, 0.2)}
SEEDS = (0, 1, 2, 3, 4)   # the paper's 5 runs per model (Tables 1-4, the 5-run ensembles)
KINDS = {"inresnet": "relu", "lambda_inresnet": "lambda", "inresnet_sig": "sig",
         "gating": "gating", "gating_sig": "gating_sig"}


def cells_of(depth: int) -> dict[str, tuple[str, dict]]:
  """Training cell -> (label, config overrides) at ``depth``."""
  names = ("resnet",) + (tuple(KINDS) if depth == 110 else ("inresnet", "lambda_inresnet"))
  label = lambda n: small.RUNS[n][0].replace("-20", f"-{depth}")
  step = lambda n: ({"name": "euler"} if n == "resnet" else
                    {"name": "damped", "kind": KINDS[n], "init_range": INIT[depth]})
  return {n: (label(n), {"model.step": step(n)}) for n in names}


def config_for(depth: int, overrides: dict) -> object:
  """``in_resnet_cifar10.py:DEPTH:resnet`` with ``overrides`` applied (a dotted key sets
  one field; a dict value replaces the whole group)."""
  return small.apply_overrides(jd.configs.load_file(CONFIG, f"{depth}:resnet"), overrides)


def paper_setup(depth: int) -> list[str]:
  """The setup section of a paper study's report."""
  c10c = os.environ.get("CIFAR10C_DIR")
  return [
      "## Setup", "",
      "- Data: CIFAR-10, 45,000 training images (5,000 held out for the best-validation "
      "checkpoint), random crop (pad 4) and flip; evaluation on the 10,000 test images.",
      f"- Model: pre-activation ResNet-{depth}; damped blocks with the authors' storage "
      f"and initial coefficients U{INIT[depth]}.",
      "- Training: natural, SGD 0.1 / 0.9, weight decay 1e-4 on every parameter, divided "
      "by 10 at epochs 80 and 120 of 160, batch 128 (the paper).",
      "- Noise: gaussian, shot, impulse and speckle noise, severities 1-5, " +
      (f"from the CIFAR-10-C files in `{c10c}`." if c10c else
       "generated with the CIFAR-10-C constants (no CIFAR10C_DIR was set when the report "
       "was written)."),
      f"- Attacks: FGSM, IFGSM-20, PGD-20 at 1/255, 2/255, 4/255, step "
      f"{small.ALPHA * 255:g}/255 as the paper states.",
  ]


def make_study(depth: int) -> Study:
  """The paper study at ``depth`` (110 or 164)."""
  if depth not in INIT:
    raise ValueError(f"depth must be 110 or 164; got {depth!r}.")
  runs = cells_of(depth)
  info = {"scale": "paper", "corruption_dir": os.environ.get("CIFAR10C_DIR")}
  cells = [Cell(n, o, description=label, info=info, seeds=SEEDS)
           for n, (label, o) in runs.items()]
  cells += [Cell(f"ensemble_{m}", needs=(m,), needs_all_seeds=True, run=small.ensemble,
                 description=f"{runs[m][0]}, logit average of every seed", seeds=(0,),
                 info={**info, "member": m}) for m in small.ENSEMBLES if m in runs]
  cells.append(Cell("analysis", needs=tuple(n for n in small.ANALYSED if n in runs),
                    run=small.analyse, seeds=(0,), info=info,
                    description="loss landscapes and Jacobian spectra"))
  tag = f"inresnet_paper{depth}"
  base = lambda overrides: config_for(depth, overrides)
  base.__qualname__ = (f"experiments/configs/in_resnet_cifar10.py:{depth}:resnet + overrides "
                       "(a dict value replaces a group)")
  return Study(
      tag, base, cells, seeds=SEEDS, run=small.train_and_eval,
      report=lambda res, out: small.report(res, out, labels={n: r[0] for n, r in runs.items()},
                                           setup=paper_setup(depth)),
      title=f"In-ResNet at the paper's scale: CIFAR-10, depth {depth}",
      spec=__file__, object_name=f"STUDY_{depth}", command_args=("--depth", str(depth)),
      results_dir=os.path.join(HERE, "results", f"paper{depth}"),
      runs_dir=os.path.join(small.ROOT, "workdirs", tag))


STUDY_110 = lambda: make_study(110)  # noqa: E731  (built on demand)
STUDY_164 = lambda: make_study(164)  # noqa: E731


if __name__ == "__main__":
  argv = sys.argv[1:]
  if "--depth" not in argv or argv.index("--depth") + 1 >= len(argv):
    sys.exit("usage: paper.py --depth {110,164} [study_main arguments: list, --cell ...]")
  i = argv.index("--depth")
  depth_arg = argv[i + 1]
  if depth_arg not in ("110", "164"):
    sys.exit(f"paper.py: --depth must be 110 or 164; got {depth_arg!r}.")
  sys.exit(jd.evaluation.study_main(make_study(int(depth_arg)), argv[:i] + argv[i + 2:]))
