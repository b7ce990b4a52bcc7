"""``jaxdefense certify --workdir DIR --eps 0.1 --domain box|zonotope|deepz[,...]``.

Standard, PGD and certified accuracy of a saved run: restores the run's checkpoint,
rebuilds its model from the stored config, and calls :func:`jaxdefense.certify.report`
on the first ``--num_examples`` test images; prints a table and writes
``DIR/certify.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax

from jaxdefense import certify, data, models, training
from jaxdefense.commands._base import (Command, UserError, int_at_least, non_negative_int,
                                       parse_eps, positive_int)

__all__ = ["COMMAND"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--workdir", required=True, help="a training run's folder")
  p.add_argument("--which", choices=("latest", "best"), default="latest")
  p.add_argument("--eps", type=parse_eps, default=0.1,
                 help="l-inf radius in [0, 1] units; fractions allowed (default 0.1)")
  p.add_argument("--domain", default="box,zonotope",
                 help="comma list of box, zonotope (DiffAI hybrid zonotope), deepz "
                      "(default box,zonotope)")
  p.add_argument("--relu", choices=("box", "deepz"), default=None,
                 help="the zonotope's ReLU (default: box; deepz for --domain deepz)")
  p.add_argument("--relu_budget", type=positive_int, default=None,
                 help="DeepZ generators per ReLU layer, >= 1 (default: one per neuron)")
  p.add_argument("--no_correlate_input", action="store_true",
                 help="zonotope: start from a box (m = 0) instead of one generator per pixel")
  p.add_argument("--num_examples", type=int_at_least(0, "0: all"), default=1000,
                 help="first N test examples (0: all; default 1000)")
  p.add_argument("--batch_size", type=positive_int, default=100,
                 help="examples per call, >= 1 (default 100)")
  p.add_argument("--pgd_steps", type=non_negative_int, default=20,
                 help="PGD iterations (0 skips the attack; default 20)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data_dir", default=None)


def _check_certifiable(model: Any, variables: Any, x: Any, eps: float,
                       domains: tuple[str, ...], kwargs: dict[str, Any], what: str) -> None:
  """Raise the library's "not certifiable" error before anything is compiled.

  Traces the abstract execution of one example per domain (``jax.eval_shape``: nothing
  runs), which raises the ``ValueError`` of a step rule that cannot run on abstract
  values (``EulerMaruyama(coef > 0)``, an input-dependent ``Damped``).  A model that
  still draws noise at evaluation time is refused with the same kind of message: a
  command-line user cannot pass the noise key (``rngs``) that the API would ask for.

  Raises:
    ValueError: the model is not certifiable.
    UserError: the model draws noise at evaluation time.
  """
  for d in domains:
    kw = {k: v for k, v in kwargs.items() if not (d == "deepz" and k == "relu")}
    jax.eval_shape(lambda v, xb, d=d, kw=kw: certify.abstract_logits(model, v, xb, eps, d,
                                                                      **kw),
                   variables, x[:1])
  if models.is_stochastic(model):
    raise UserError(f"{what} is not certifiable: it draws noise at evaluation time "
                    "(stochastic), and certification needs a deterministic network "
                    "(Euler, EulerMaruyama(coef=0), Damped with a scalar coefficient).")


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
  del overrides  # not accepted (config_overrides=False)
  domains = tuple(d.strip() for d in args.domain.split(",") if d.strip())
  if not domains:
    raise UserError(f"--domain must name at least one of {list(certify.DOMAINS)}; "
                    f"got {args.domain!r}.")
  for d in domains:
    if d not in certify.DOMAINS:
      raise UserError(f"--domain must list names from {list(certify.DOMAINS)}; got {d!r}.")
  if "deepz" in domains and args.relu not in (None, "deepz"):
    raise UserError(f"--domain deepz implies --relu deepz; got --relu {args.relu}.")
  state, config = training.restore(args.workdir, which=args.which)
  test = data.load(config.dataset, "test", data_dir=args.data_dir or config.get("data_dir"))
  if args.num_examples:
    test = test.take(int(args.num_examples))
  model = training.build_model(config, test.num_classes)
  kwargs = {"relu_budget": args.relu_budget, "correlate_input": not args.no_correlate_input}
  if args.relu is not None:
    kwargs["relu"] = args.relu
  _check_certifiable(model, state.variables, test.images, args.eps, domains, kwargs,
                     f"the model of {str(args.workdir)!r} ({config.model.name})")
  rows = {}
  base = None
  for d in domains:  # one report per domain: the relu option differs for "deepz"
    kw = dict(kwargs)
    if d == "deepz":
      kw.pop("relu", None)
    rep = certify.report(model, state.variables, test.images, test.labels, args.eps,
                         domains=(d,), key=jax.random.PRNGKey(args.seed),
                         pgd_steps=args.pgd_steps if base is None else 0,
                         batch_size=args.batch_size, **kw)
    if base is None:
      base = rep
    rows[d] = rep[f"certified_{d}"]
  result = {"workdir": os.fspath(args.workdir), "which": args.which, "eps": args.eps,
            "n": base["n"], "standard": base["standard"],
            **({"pgd": base["pgd"]} if "pgd" in base else {}),
            **{f"certified_{d}": v for d, v in rows.items()}}
  print(f"{config.model.name} on {config.dataset} ({args.which} checkpoint), eps={args.eps:g}, "
        f"n={result['n']}")
  for k, v in result.items():
    if k.startswith(("standard", "pgd", "certified")):
      print(f"  {k:<22} {100 * v:6.2f} %")
  path = os.path.join(args.workdir, "certify.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"written: {path}")
  return 0


#: The ``certify`` subcommand.
COMMAND = Command("certify", "standard, PGD and certified accuracy of a saved run "
                  "(box / hybrid zonotope / DeepZ)", _add_arguments, _run)
