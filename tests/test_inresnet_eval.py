"""In-ResNet evaluation (issue 11, section 2): the attack suite with the paper's step,
noise corruptions pooled over severities (synthetic and from CIFAR-10-C files), and
ensembles over independently trained runs; bad inputs (issue 18)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdefense as jd
from jaxdefense import commands, configs, evaluation, training

SHAPE = (8, 8, 3)
NOISE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")


def linear_model(num_classes, seed=0):
  """A jitted linear classifier ``f`` and its NumPy twin ``predict(x) -> classes``
  (expected values are computed in NumPy: no extra compilation)."""
  w = np.random.default_rng(seed).normal(size=(int(np.prod(SHAPE)), num_classes))
  w = w.astype(np.float32)
  f = jax.jit(lambda x: x.reshape(x.shape[0], -1) @ w)
  f.predict = lambda x: np.argmax(np.asarray(x, np.float32).reshape(len(x), -1) @ w, -1)
  return f


def images(n, seed):
  return np.random.default_rng(seed).uniform(size=(n,) + SHAPE).astype(np.float32)


@pytest.fixture(scope="module")
def data():
  """24 images, a 4-class linear model and labels = its clean predictions (3 flipped)."""
  f = linear_model(4)
  x = images(24, seed=1)
  y = f.predict(x).astype(np.int32)
  y[:3] = (y[:3] + 1) % 4
  return f, x, y


# ------------------------------------------------------------------ attack suite
def test_step_size_key_is_parsed_and_used_at_every_eps(data):
  f, x, y = data
  spec = evaluation.parse_attack("ifgsm:steps=5,step_size=2/255")
  assert spec.step_size == pytest.approx(2 / 255) and spec.step_fraction is None
  assert "step_size" not in spec.kwargs and spec.step_rule() == "2/255 (fixed)"
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  for eps in (1 / 255, 4 / 255):
    got = spec.run(f, xj, yj, jax.random.key(2), eps)
    np.testing.assert_array_equal(
        got, jd.attacks.ifgsm(f, xj, yj, eps=eps, step_size=2 / 255, steps=5))
  # at eps 1/255 the default step (2.5 eps / steps = 0.5/255) is not the fixed 2/255
  fixed = spec.run(f, xj, yj, jax.random.key(2), 1 / 255)
  default = jd.attacks.ifgsm(f, xj, yj, eps=1 / 255, steps=5)
  assert not np.array_equal(np.asarray(fixed), np.asarray(default))
  assert evaluation.parse_attack("pgd:steps=3,step_size=1/255").step_size == 1 / 255
  assert evaluation.parse_attack("pgd:step_fraction=1/4").step_rule() == "eps * 0.25"
  assert evaluation.parse_attack("pgd").step_rule() == "default of pgd"


@pytest.mark.parametrize("spec, match", [
    ("pgd:step_size=0.01,step_fraction=0.5", "step_size or step_fraction, not both"),
    ("pgd:step_size=0", r"step_size must be a number in \(0, 1\]"),
    ("ifgsm:step_size=2", r"step_size must be a number in \(0, 1\]"),
    ("ifgsm:step_size=abc", "step_size must be a number"),
    ("fgsm:step_size=2/255", "fgsm takes no step"),
    ("cw:step_fraction=1/4", "cw takes no step"),
])
def test_bad_step_keys(spec, match):
  with pytest.raises(ValueError, match=match):
    evaluation.parse_attack(spec)


def test_inresnet_suite_is_the_papers(data):
  specs = evaluation.parse_suite("inresnet")
  assert [s.fn.__name__ for s in specs] == ["fgsm", "ifgsm", "pgd"]
  assert [s.kwargs.get("steps") for s in specs] == [None, 20, 20]
  assert specs[0].step_size is None
  assert [s.step_size for s in specs[1:]] == [pytest.approx(2 / 255)] * 2
  assert all(s.step_fraction is None for s in specs)
  assert specs[2].kwargs.get("random_start", True)       # PGD: uniform random start
  assert evaluation.INRESNET_RADII == pytest.approx((1 / 255, 2 / 255, 4 / 255))
  # the report says which step each attack used (a short IFGSM keeps the test fast)
  f, x, y = data
  rep = evaluation.evaluate_robustness(f, x[:8], y[:8], key=jax.random.key(0), eps=1 / 255,
                                       suite=[specs[0], "ifgsm:steps=3,step_size=2/255"],
                                       batch_size=8, progress=False)
  assert rep.meta["attack_steps"] == {"fgsm": "eps (one step)",
                                      "ifgsm(steps=3,step_size=2/255)": "2/255 (fixed)"}
  x_adv = jd.attacks.ifgsm(f, jnp.asarray(x[:8]), jnp.asarray(y[:8]), eps=1 / 255,
                           step_size=2 / 255, steps=3)
  expected = float(np.mean(f.predict(x_adv) == y[:8]))
  assert rep.attacks["ifgsm(steps=3,step_size=2/255)"] == pytest.approx(expected)


# ------------------------------------------------------------------ corruptions
def test_noise_rows_per_severity_and_pooled(data):
  """Two of the four kinds (one compiled program per kind); the "noise" preset itself is
  evaluated from files in test_corruptions_from_cifar10c_files."""
  f, x, y = data
  key = jax.random.key(7)
  kinds = ("gaussian_noise", "impulse_noise")
  rep = evaluation.evaluate_robustness(f, x, y, key=key, suite=(),
                                       corruptions="gaussian_noise, impulse_noise",
                                       batch_size=32, progress=False)
  assert tuple(rep.corruptions) == kinds
  assert all(sorted(per) == [1, 2, 3, 4, 5] for per in rep.corruptions.values())
  for kind, per in rep.corruptions.items():
    assert rep.corruption_pooled(kind) == pytest.approx(np.mean(list(per.values())))
    assert all(0 <= a <= 1 and (a * len(y)) == pytest.approx(round(a * len(y)))
               for a in per.values())
  every = [a for per in rep.corruptions.values() for a in per.values()]
  assert rep.corruption_pooled() == pytest.approx(np.mean(every))
  assert rep.corruption_pooled() == pytest.approx(
      np.mean([rep.corruption_pooled(k) for k in kinds]))
  rows = {r["evaluation"]: r["accuracy"] for r in rep.rows()}
  assert len(rows) == 1 + 2 * 5 + 2 + 1
  assert rows["impulse_noise s3"] == rep.corruptions["impulse_noise"][3]
  assert rows["gaussian_noise (mean of s1-5)"] == rep.corruption_pooled("gaussian_noise")
  assert rows["corruptions: mean of 2 kinds x s1-5"] == rep.corruption_pooled()
  js = rep.to_json()
  assert js["corruption_mean"] == rep.corruption_pooled()
  assert js["corruptions_pooled"]["gaussian_noise"] == rep.corruption_pooled("gaussian_noise")
  assert "data.corrupt" in rep.meta["corruption_source"]
  # Severity s of kind i uses key fold_in(k_corrupt, 10 i + s) (batch b: fold_in(., b));
  # one batch here: recompute impulse (i = 1) at severity 4 with data.corrupt directly.
  k_corrupt = jax.random.split(key, 3)[2]
  kb = jax.random.fold_in(jax.random.fold_in(k_corrupt, 10 * 1 + 4), 0)
  xc = jd.data.corrupt(x, "impulse_noise", 4, jax.random.split(kb)[0])
  expected = float(np.mean(f.predict(xc) == y))
  assert rep.corruptions["impulse_noise"][4] == pytest.approx(expected)
  # severity 5 Gaussian noise (std 0.10) hurts a linear model more than severity 1 (0.04)
  assert rep.corruptions["gaussian_noise"][5] <= rep.corruptions["gaussian_noise"][1]


def write_cifar_c(folder, labels, m, kinds=NOISE + ("fog",), seed=0):
  """Fake CIFAR-10-C files: ``<kind>.npy`` uint8 [5 m, H, W, C], ``labels.npy`` [5 m]."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  out = {}
  for kind in kinds:
    out[kind] = rng.integers(0, 256, (5 * m,) + SHAPE, dtype=np.uint8)
    np.save(folder / f"{kind}.npy", out[kind])
  np.save(folder / "labels.npy", np.tile(labels, 5).astype(np.uint8))
  return out


def test_corruptions_from_cifar10c_files(tmp_path):
  f = linear_model(10, seed=3)
  m, n = 8, 6
  labels = np.random.default_rng(1).integers(0, 10, m)
  files = write_cifar_c(tmp_path / "CIFAR-10-C", labels, m)
  x = images(n, seed=5)
  y = labels[:n].astype(np.int32)
  rep = evaluation.evaluate_robustness(f, x, y, key=jax.random.key(0), suite=(),
                                       corruptions="noise", severities=(2, 5),
                                       corruption_dir=tmp_path, batch_size=4, progress=False)
  assert tuple(rep.corruptions) == NOISE
  for kind in NOISE:
    for s in (2, 5):
      block = files[kind][(s - 1) * m:(s - 1) * m + n].astype(np.float32) / 255
      expected = float(np.mean(f.predict(block) == y))
      assert rep.corruptions[kind][s] == pytest.approx(expected)
    assert rep.corruption_pooled(kind) == pytest.approx(
        (rep.corruptions[kind][2] + rep.corruptions[kind][5]) / 2)
  every = [a for per in rep.corruptions.values() for a in per.values()]
  assert rep.corruption_pooled() == pytest.approx(np.mean(every))
  assert str(tmp_path) in rep.meta["corruption_source"]
  text = rep.to_text()
  assert "gaussian_noise (mean of s2,5)" in text and "mean of 4 kinds x s2,5" in text
  # any CIFAR-10-C corruption can be read from the files (not only the noise family)
  fog = evaluation.evaluate_robustness(f, x, y, key=jax.random.key(0), suite=(),
                                       corruptions=["fog"], severities=(1,),
                                       corruption_dir=tmp_path / "CIFAR-10-C",
                                       batch_size=4, progress=False)
  block = files["fog"][:n].astype(np.float32) / 255
  assert fog.corruptions["fog"][1] == pytest.approx(
      float(np.mean(f.predict(block) == y)))
  # the files' labels must be those of the clean images given
  with pytest.raises(ValueError, match="differ from labels at"):
    evaluation.evaluate_robustness(f, x, (y + 1) % 10, key=jax.random.key(0), suite=(),
                                   corruptions="fog", corruption_dir=tmp_path,
                                   progress=False)
  big = np.concatenate([x, x])
  with pytest.raises(ValueError, match="num_examples must be <= 8"):
    evaluation.evaluate_robustness(f, big, np.concatenate([y, y]), key=jax.random.key(0),
                                   suite=(), corruptions="fog", corruption_dir=tmp_path,
                                   progress=False)
  (tmp_path / "CIFAR-10-C" / "shot_noise.npy").unlink()
  with pytest.raises(FileNotFoundError, match="shot_noise"):
    evaluation.evaluate_robustness(f, x, y, key=jax.random.key(0), suite=(),
                                   corruptions="noise", corruption_dir=tmp_path,
                                   progress=False)
  with pytest.raises(FileNotFoundError, match="is not a folder"):
    evaluation.evaluate_robustness(f, x, y, key=jax.random.key(0), corruptions="noise",
                                   corruption_dir=tmp_path / "nowhere", progress=False)
  with pytest.raises(ValueError, match="without corruptions"):
    evaluation.evaluate_robustness(f, x, y, key=jax.random.key(0), corruption_dir=tmp_path,
                                   progress=False)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(corruptions=("fog",)), ValueError, "pass corruption_dir"),
    (dict(corruptions=("noise", "fog")), ValueError, "preset 'noise' must be given alone"),
    (dict(corruptions=("shot_noise", "shot_noise")), ValueError, "must not repeat"),
    (dict(corruptions=7), TypeError, "corruptions must be"),
    (dict(corruptions="noise", severities=(0, 1)), ValueError, "severities must be >= 1"),
    (dict(corruptions="noise", severities=(6,)), ValueError, "severities must be <= 5"),
    (dict(corruptions="noise", severities=()), ValueError, "at least one severity"),
    (dict(corruptions="noise", severities=(2, 2)), ValueError, "must not repeat"),
    (dict(eot_samples=0), ValueError, "eot_samples must be >= 1; got 0"),
])
def test_bad_corruption_arguments(data, kwargs, error, match):
  f, x, y = data
  with pytest.raises(error, match=match):
    evaluation.evaluate_robustness(f, x, y, key=jax.random.key(0), suite=(),
                                   progress=False, **kwargs)


def test_labels_out_of_range_and_empty_batches_are_rejected(data):
  f, x, y = data   # 4 classes
  for bad in (4, -1, 12):
    labels = y.copy()
    labels[5] = bad
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\) for 4 classes"):
      evaluation.evaluate_robustness(f, x, labels, key=jax.random.key(0), progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
      evaluation.accuracy_vs_eps(f, x, labels, key=jax.random.key(0), eps_values=(0.0,))
  with pytest.raises(ValueError, match="images must hold at least one example"):
    evaluation.evaluate_robustness(f, x[:0], y[:0], key=jax.random.key(0), progress=False)
  with pytest.raises(ValueError, match="logits_fn must return logits"):
    evaluation.evaluate_robustness(lambda xb: xb.sum(), x, y, key=jax.random.key(0),
                                   progress=False)


# ------------------------------------------------------------------ ensembles of runs
def save_tiny_run(workdir, seed, num_classes=10):
  """A checkpoint of an untrained 8-unit MLP for digits, saved with the training API."""
  config = configs.get("demo", ["model.name=mlp", "model.hidden=(8,)", f"seed={seed}"])
  exp = training.build_experiment(config, num_classes=num_classes, image_shape=(8, 8, 1),
                                  steps_per_epoch=1)
  state = exp.init_state(jd.data.make_mesh())
  ckpt = training.Checkpoints(workdir)
  try:
    ckpt.save(state.to_tree(), json.loads(exp.config.to_json()), exp.info())
  finally:
    ckpt.close()
  return exp.model, {"params": state.params, **state.model_state}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("ensemble_runs")
  return [(root / f"seed{s}", *save_tiny_run(root / f"seed{s}", s)) for s in (0, 1)]


def test_ensemble_of_runs_averages_their_logits(runs):
  x = jnp.asarray(jd.data.load("digits", "test").images[:5])
  logits = [np.asarray(module.apply(v, x, train=False)) for _, module, v in runs]
  assert not np.allclose(logits[0], logits[1])       # two different runs
  ens = evaluation.restore_ensemble([str(runs[0][0]), runs[1][0]])
  assert isinstance(ens, jd.models.ModelFn) and not ens.stochastic
  np.testing.assert_allclose(ens(x), (logits[0] + logits[1]) / 2, rtol=1e-5, atol=1e-6)
  weighted = evaluation.restore_ensemble([runs[0][0], runs[1][0]], weights=(3, 1))
  np.testing.assert_allclose(weighted(x), 0.75 * logits[0] + 0.25 * logits[1],
                             rtol=1e-5, atol=1e-6)


def test_ensemble_bad_inputs(runs, tmp_path):
  a = runs[0][0]
  with pytest.raises(ValueError, match="at least one run"):
    evaluation.restore_ensemble([])
  with pytest.raises(TypeError, match="single path"):
    evaluation.restore_ensemble(str(a))
  with pytest.raises(TypeError, match=r"workdirs\[1\] must be a path"):
    evaluation.restore_ensemble([a, 3])
  with pytest.raises(FileNotFoundError, match=r"workdirs\[1\] = .*missing.* does not exist"):
    evaluation.restore_ensemble([a, tmp_path / "missing"])
  with pytest.raises(ValueError, match=r"workdirs\[1\] .* repeats workdirs\[0\]"):
    evaluation.restore_ensemble([a, str(a) + "/"])
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="checkpoint"):
    evaluation.restore_ensemble([a, tmp_path / "empty"])
  save_tiny_run(tmp_path / "three", seed=2, num_classes=3)
  with pytest.raises(ValueError, match="same num_classes.*: 10.*: 3"):
    evaluation.restore_ensemble([a, tmp_path / "three"])


# ------------------------------------------------------------------ command line
def run_main(*argv):
  return commands.main([*argv, "--compile_cache", os.environ["JAX_COMPILATION_CACHE_DIR"]])


@pytest.mark.parametrize("flag, value", [("--num_examples", "-5"), ("--eot_samples", "0"),
                                         ("--batch_size", "0"), ("--severities", "0,3")])
def test_attack_command_rejects_bad_counts(tmp_path, capsys, flag, value):
  with pytest.raises(SystemExit) as e:
    run_main("attack", "--workdir", str(tmp_path), flag, value)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert f"argument {flag}" in err and repr(value) in err


def test_attack_command_passes_corruption_flags(tmp_path, monkeypatch, capsys):
  seen = {}

  def fake_run(workdir, **kwargs):
    seen.update(kwargs, workdir=workdir)
    rep = evaluation.RobustnessReport(eps=kwargs["eps"], num_examples=1, clean=1.0,
                                      corruptions={"shot_noise": {1: 0.5, 3: 0.25}})
    return rep, None
  monkeypatch.setattr(evaluation, "evaluate_run", fake_run)
  assert run_main("attack", "--workdir", str(tmp_path), "--suite", "inresnet",
                  "--eps", "2/255", "--corruptions", "noise", "--severities", "1,3",
                  "--corruption_dir", str(tmp_path)) == 0
  assert seen["corruptions"] == "noise" and seen["severities"] == (1, 3)
  assert seen["corruption_dir"] == str(tmp_path) and seen["suite"] == "inresnet"
  assert seen["eps"] == pytest.approx(2 / 255)
  out = capsys.readouterr().out
  assert "shot_noise s3" in out and "shot_noise (mean of s1,3)" in out and "37.50 %" in out
