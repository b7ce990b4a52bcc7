"""DiffAI's training language: goal semantics, schedules, the parser and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdefense as jd
from jaxdefense import objectives as O
from jaxdefense.models import ModelFn, bind
from jaxdefense.models import _diffai
from jaxdefense.objectives import _language as L
from jaxdefense.objectives._certified import CertifiedObjective

K = 3
EPS = 0.1


def _images(n=4, lo=0.0, hi=1.0, seed=0):
  rng = np.random.RandomState(seed)
  x = rng.uniform(lo, hi, (n, 8, 8, 1)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(rng.randint(0, K, n).astype(np.int32))


@pytest.fixture(scope="module")
def net():
  model = jd.models.create("ffnn", num_classes=K)
  x, _ = _images()
  return model, jax.jit(model.init)(jax.random.PRNGKey(0), x)


def _ce(model, v, x, y):
  return float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y)))


def _ctx(model, v, y, epoch=None):
  m = bind(model, v, train=True)
  return L._Context(m, m.replace(mutable=tuple(m.mutable) + ("losses",)), y, epoch)


def _loss(model, v, text, x, y, key=jax.random.PRNGKey(0), epoch=None, eps=EPS):
  obj = O.parse(text, eps=eps)
  loss, aux = jax.jit(lambda v, x, y, k, e: obj(bind(model, v, train=True), x, y, k,
                                                 epoch=e))(v, x, y, key, epoch)
  return float(loss), aux


def _box(x, eps=EPS):
  return jnp.clip(x - eps, 0, 1), jnp.clip(x + eps, 0, 1)


# ---------------------------------------------------------------- concrete goals
def test_point_is_the_centre_of_the_clipped_box(net):
  model, v = net
  x, y = _images()
  x = x.at[0].set(0.0).at[1].set(1.0)            # clipped at 0 and at 1
  lo, hi = _box(x, 0.3)
  centre = (lo + hi) / 2
  assert not np.allclose(centre, x)              # the centre is not x near the borders
  el = O.Point().element(_ctx(model, v, y), lo, hi, None)
  np.testing.assert_allclose(el.center(), centre)
  loss, aux = _loss(model, v, "Point", x, y, eps=0.3)
  assert loss == pytest.approx(_ce(model, v, centre, y), rel=1e-5)
  np.testing.assert_allclose(aux["logits"], model.apply(v, x), rtol=1e-5)   # clean x
  assert aux["point_loss"] == pytest.approx(_ce(model, v, x, y), rel=1e-5)


@pytest.mark.parametrize("goal", [O.Normal(), O.Uniform()])
def test_random_points_stay_in_the_box_and_follow_the_key(net, goal):
  model, v = net
  x, y = _images(lo=0.0, hi=0.15)                # many pixels clipped at 0
  lo, hi = _box(x)
  ctx = _ctx(model, v, y)
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  p1 = goal.element(ctx, lo, hi, k1).center()
  assert bool(jnp.all((p1 >= lo) & (p1 <= hi)))
  np.testing.assert_array_equal(p1, goal.element(ctx, lo, hi, k1).center())
  p2 = goal.element(ctx, lo, hi, k2).center()
  assert not np.allclose(p1, p2)
  # the spread follows the box: normalised offsets (p - c) / r
  z = np.asarray((p1 - (lo + hi) / 2) / ((hi - lo) / 2)).ravel()
  if isinstance(goal, O.Uniform):
    assert abs(z.mean()) < 0.15 and abs(z.var() - 1 / 3) < 0.08
  else:   # a clipped standard normal: |z| = 1 with probability 2 (1 - Phi(1)) ~ 0.317
    assert abs(np.mean(np.abs(z) >= 1 - 1e-6) - 0.317) < 0.08
  with pytest.raises(ValueError, match="key"):
    O.parse(str(goal))(bind(model, v, train=True), x, y, None)


def test_ifgsm_points_stay_in_the_ball_and_increase_the_loss(net):
  model, v = net
  x, y = _images()
  x = x.at[0].set(0.02)
  lo, hi = _box(x)
  for k in (1, 3):
    p = jax.jit(lambda v: O.IFGSM(k).element(_ctx(model, v, y), lo, hi, None).center())(v)
    assert float(jnp.max(jnp.abs(p - x))) <= EPS + 1e-6
    assert float(jnp.min(p)) >= 0 and float(jnp.max(p)) <= 1
    assert _ce(model, v, p, y) > _ce(model, v, (lo + hi) / 2, y)
    loss, _ = _loss(model, v, f"IFGSM{k}", x, y)
    assert loss == pytest.approx(_ce(model, v, p, y), rel=1e-4)
  # one step from the centre goes to a corner of the box
  p = O.IFGSM(1).element(_ctx(model, v, y), lo, hi, None).center()
  assert bool(jnp.all(jnp.isclose(p, lo) | jnp.isclose(p, hi)))


# ---------------------------------------------------------------- abstract goals
def test_abstract_goals_bound_the_point_and_sampled_losses(net):
  model, v = net
  x, y = _images()
  point, _ = _loss(model, v, "Point", x, y)
  uniform = max(_loss(model, v, "Uniform", x, y, key=jax.random.PRNGKey(i))[0]
                for i in range(3))
  losses = {}
  for goal in ("Box", "HBox", "Zonotope", "DeepZ", "DeepZ(4)"):
    losses[goal], aux = _loss(model, v, goal, x, y)
    assert losses[goal] >= max(point, uniform) - 1e-6
    assert "certified" in aux and 0 <= float(aux["certified"]) <= 1
  # the zonotope with one generator per pixel is at least as tight as the box
  assert losses["Zonotope"] <= losses["Box"] + 1e-5


def test_sub_closed_form(net):
  model, v = net
  x, y = _images()
  lo, hi = _box(x)
  c, r = (lo + hi) / 2, (hi - lo) / 2
  ctx = _ctx(model, v, y)
  el = O.Sub(0.3, O.Box()).element(ctx, lo, hi, None)
  np.testing.assert_allclose(el.lo, c - 0.3 * r, atol=1e-7)
  np.testing.assert_allclose(el.hi, c + 0.3 * r, atol=1e-7)
  nested = O.Sub(0.5, O.Sub(0.6, O.Box())).element(ctx, lo, hi, None)   # delta multiplies
  np.testing.assert_allclose(nested.lo, c - 0.3 * r, atol=1e-7)
  point, _ = _loss(model, v, "Point", x, y)
  box, _ = _loss(model, v, "Box", x, y)
  assert _loss(model, v, "Sub(0, Box)", x, y)[0] == pytest.approx(point, rel=1e-5)
  assert _loss(model, v, "Sub(1, Box)", x, y)[0] == pytest.approx(box, rel=1e-6)
  assert _loss(model, v, "Sub(0, Uniform)", x, y)[0] == pytest.approx(point, rel=1e-5)
  half, _ = _loss(model, v, "Sub(0.5, Box)", x, y)
  assert point < half < box
  # Sub(delta, Box) at eps is Box at delta * eps away from the borders
  xi, yi = _images(lo=0.2, hi=0.8)
  assert _loss(model, v, "Sub(0.5, Box)", xi, yi)[0] == pytest.approx(
      _loss(model, v, "Box", xi, yi, eps=EPS / 2)[0], rel=1e-5)


def test_mix_weights(net):
  model, v = net
  x, y = _images()
  p, _ = _loss(model, v, "Point", x, y)
  b, _ = _loss(model, v, "Box", x, y)
  assert _loss(model, v, "Mix(Point, Box, 0.25)", x, y)[0] == pytest.approx(
      0.75 * p + 0.25 * b, rel=1e-5)
  assert _loss(model, v, "Mix(a=Point(), b=Box(), aw=2, bw=3)", x, y)[0] == pytest.approx(
      2 * p + 3 * b, rel=1e-5)
  assert _loss(model, v, "Mix(Point, Box, 2, 0)", x, y)[0] == pytest.approx(2 * p, rel=1e-5)
  text = "Mix(Point, Box, Lin(0, 0.5, 2, 3))"   # lam = 0.5 * (t - 2) / 3 on [2, 5]
  for t, lam in ((0.0, 0.0), (3.5, 0.25), (9.0, 0.5)):
    assert _loss(model, v, text, x, y, epoch=jnp.float32(t))[0] == pytest.approx(
        (1 - lam) * p + lam * b, rel=1e-5)
  m = O.Mix(O.Point(), O.Box(), 0.3)
  assert m.aw is None and m.bw == 0.3 and m == O.Mix(O.Point(), O.Box(), bw=0.3)
  assert O.Mix(O.Point(), O.Box(), 1, 2) == O.Mix(O.Point(), O.Box(), aw=1, bw=2)


def test_sample_and_bisample_closed_forms(net):
  model, v = net
  x, y = _images()
  lo, hi = _box(x)
  c, r = (lo + hi) / 2, (hi - lo) / 2
  ctx = _ctx(model, v, y)
  key = jax.random.PRNGKey(3)
  # centre sampler: Sample(delta, r, Point, g) is Sub(delta, g)
  el = O.Sample(0.4, 0.5, O.Point(), O.Box()).element(ctx, lo, hi, key)
  np.testing.assert_allclose(el.lo, c - 0.4 * r, atol=1e-7)
  np.testing.assert_allclose(el.hi, c + 0.4 * r, atol=1e-7)
  # r = 1: the sampled box of relative size delta stays inside the input box
  for delta in (0.3, 0.7, 1.0):
    el = O.Sample(delta, 1.0, O.Uniform(), O.Box()).element(ctx, lo, hi, key)
    np.testing.assert_allclose(el.hi - el.lo, 2 * delta * r, atol=1e-6)
    assert bool(jnp.all((el.lo >= lo - 1e-6) & (el.hi <= hi + 1e-6)))
  # r = 0.5, delta = 1: the centre moves within half the box, the box keeps its size
  el = O.Sample(1.0, 0.5, O.Uniform(), O.Box()).element(ctx, lo, hi, key)
  b = (el.lo + el.hi) / 2
  assert bool(jnp.all(jnp.abs(b - c) <= 0.5 * r + 1e-6)) and not np.allclose(b, c)
  # BiSample: the box reaching g1's upper bound
  el = O.BiSample(O.Sub(0.5, O.Box()), O.Box()).element(ctx, lo, hi, key)
  np.testing.assert_allclose(el.lo, c - 0.5 * r, atol=1e-7)
  el = O.BiSample(O.Uniform(), O.Box()).element(ctx, lo, hi, key)
  u = O.Uniform().element(ctx, lo, hi, jax.random.fold_in(key, 0)).center()
  np.testing.assert_allclose(el.hi, c + jnp.abs(u - c), atol=1e-7)
  point, _ = _loss(model, v, "Point", x, y)
  assert _loss(model, v, "BiSample(Point, Box)", x, y)[0] == pytest.approx(point, rel=1e-5)
  assert _loss(model, v, "BiSample(Box, Box)", x, y)[0] == pytest.approx(
      _loss(model, v, "Box", x, y)[0], rel=1e-6)


# ---------------------------------------------------------------- schedules
def test_schedule_values_and_nesting():
  v = lambda s, t: float(L.schedule_value(s, jnp.float32(t)))
  lin = O.Lin(0.0, 1.0, 2.0, 4.0)
  assert [v(lin, t) for t in (0, 2, 3, 6, 9)] == pytest.approx([0, 0, 0.25, 1, 1])
  until = O.Until(2, O.Lin(0, 1, 0, 2), O.Lin(1, 0, 1, 1))   # second part sees t - 2
  assert [v(until, t) for t in (0, 1, 1.9, 2, 3, 3.5, 4, 9)] == pytest.approx(
      [0, 0.5, 0.95, 1, 1, 0.5, 0, 0])
  nested = O.Lin(O.Until(1, 0, 0.5), 1.0, 2.0, 2.0)           # start switches at 1
  assert [v(nested, t) for t in (0, 1, 2, 3, 4)] == pytest.approx([0, 0.5, 0.5, 0.75, 1])
  # a nested Lin is a schedule wherever a callable schedule is taken (CertifiedObjective,
  # LAD's eta_schedule): calling it gives the same values
  assert [float(nested(jnp.float32(t))) for t in (0, 1, 2, 3, 4)] == pytest.approx(
      [0, 0.5, 0.5, 0.75, 1])
  assert v(3.0, 7) == 3.0
  assert float(L.schedule_value(lin, None)) == 1.0              # no epoch: the end value
  assert L.schedule_range(O.Until(1, O.Lin(-1, 2, 0, 1), 0.5)) == (-1.0, 2.0)
  # the paper's DeepLoss weight schedules (section 5.1), three-argument Lin included
  o = O.parse("DeepLoss(Until(24, Lin(0, 0.1, 20, 4), Lin(0.1, 0, 50)), Box)")
  assert o.goal.weight == O.Until(24, O.Lin(0, 0.1, 20, 4), O.Lin(0.1, 0, 50, 0))
  assert [v(o.goal.weight, t) for t in (21, 30, 73, 74)] == pytest.approx([0.025, 0.1, 0.1, 0])


def test_no_retrace_when_the_epoch_changes(net):
  model, v = net
  x, y = _images()
  obj = O.parse("Mix(Point, Sub(Lin(0, 1, 0, 4), Box), Until(2, 0, Lin(0, 0.5, 0, 2)))")
  traces = []

  @jax.jit
  def run(v, epoch):
    traces.append(1)
    return obj(bind(model, v, train=True), x, y, jax.random.PRNGKey(0), epoch=epoch)[0]

  values = [float(run(v, jnp.float32(t))) for t in (0.0, 1.0, 2.5, 3.0, 8.0)]
  assert len(traces) == 1
  point, _ = _loss(model, v, "Point", x, y)
  assert values[0] == pytest.approx(point, rel=1e-5) and values[1] == values[0]
  assert values[2] != values[3] != values[4]


# ---------------------------------------------------------------- against CertifiedObjective
@pytest.mark.parametrize("goal,domain", [("Box", "box"), ("HBox", "zonotope")])
def test_baseline_matches_certified_objective(goal, domain):
  model = _diffai.DiffAINet(dense=(16, 8), num_classes=K,
                            abstract=(("dense0", _diffai.Abstract.of("deep_loss", weight=0.5)),))
  x, y = _images(lo=EPS, hi=1 - EPS)            # interior: centre == x, no clipping
  v = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  text = f"Mix(Point, Sub(Lin(0, 1, 2, 3), {goal}), Lin(0, 0.5, 2, 3))"
  ref = CertifiedObjective(eps=EPS, domain=domain, eps_schedule=O.Lin(0, 1, 2, 3),
                           mix=O.Lin(0, 0.5, 2, 3))
  ours = O.parse(text, eps=EPS)
  assert ours.needs_abstract_apply and ours.uses_epoch
  m = bind(model, v, train=True)
  for t in (0.0, 3.5, 10.0):
    l_ref, a_ref = jax.jit(lambda e: ref(m, x, y, None, epoch=e))(jnp.float32(t))
    l_new, a_new = jax.jit(lambda e: ours(m, x, y, None, epoch=e))(jnp.float32(t))
    assert float(l_new) == pytest.approx(float(l_ref), rel=1e-5)
    assert float(a_new["deep_loss"]) == pytest.approx(float(a_ref["deep_loss"]), rel=1e-5)
    np.testing.assert_allclose(a_new["logits"], a_ref["logits"], rtol=1e-6)
    assert a_new["model_state"] == a_ref["model_state"] == {}
  assert float(a_ref["deep_loss"]) > 0
  # the DeepLoss weight scales the sown terms (and only them)
  base, aux = jax.jit(lambda: ours(m, x, y, None))()
  for w in (0.0, 2.0):
    weighted = O.parse(f"DeepLoss({w:g}, {text})", eps=EPS)
    loss, aux_w = jax.jit(lambda: weighted(m, x, y, None))()
    assert float(loss) == pytest.approx(float(base) + (w - 1) * float(aux["deep_loss"]),
                                        rel=1e-5)
    assert float(aux_w["deep_loss"]) == pytest.approx(w * float(aux["deep_loss"]), rel=1e-5)
  grads = jax.grad(lambda p: ours(bind(model, {"params": p}, train=True), x, y, None)[0])(
      v["params"])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_objective_contract(net):
  model, v = net
  x, y = _images()
  concrete = O.parse("Mix(Point, IFGSM(2), 0.5)")
  assert not concrete.needs_abstract_apply and O.parse("Baseline").needs_abstract_apply
  loss, aux = _loss(model, v, "Mix(Point, IFGSM(2), 0.5)", x, y)
  assert {"logits", "model_state", "point_loss", "goal_loss", "deep_loss"} <= set(aux)
  assert "certified" not in aux and aux["logits"].shape == (4, K)
  assert hash(O.parse("InSamp")) == hash(O.parse("InSamp"))
  with pytest.raises(TypeError, match="ModelFn"):
    concrete(lambda a: a, x, y, None)
  with pytest.raises(TypeError, match="abstract"):
    O.parse("Box")(ModelFn.wrap(lambda a: jnp.zeros((4, K))), x, y, None)
  with pytest.raises(ValueError, match="eps"):
    O.DiffAIObjective(O.Box(), eps=1.5)
  with pytest.raises(TypeError, match="goal"):
    O.DiffAIObjective(O.Lin(0, 1), eps=0.1)


# ---------------------------------------------------------------- the text
_NESTED = [
    "Mix(a=Point(), b=Sub(Lin(0, 0.1, 2, 3), Box()), aw=1, bw=Lin(0, 0.5, 2, 3))",
    "Sub(Until(3, Lin(0, 0.5, 1, 2), Lin(0.5, 1, 0, 4)), Sample(Lin(Until(1, 0, 0.2), 1, 2, 3),"
    " 0.5, Normal, DeepZ(8)))",
    "DeepLoss(Until(90, Lin(0, 0.2, 50, 40), 0), BiSample(Sub(Lin(0, 1, 150, 30), IFGSM3), "
    "HBox))",
    "DiffAI(Mix(Uniform, Zonotope, 1e-3, 2.5), eps=0.03137)",
    "Sample(0.5, Normal(), Box())",
]


@pytest.mark.parametrize("text", list(O.PRESETS) + _NESTED)
def test_round_trip(text):
  o = O.parse(text)
  s = str(o)
  assert O.parse(s) == o and str(O.parse(s)) == s
  assert O.parse(str(o.goal), eps=o.eps) == o


def test_paper_notation_and_presets():
  verbatim = "Mix(Point,Sub(Lin(0,1,150,10),Box),Lin(0,0.5,150,10))"   # section 4.3
  assert O.parse(verbatim) == O.parse("Baseline") == O.parse(O.PRESETS["Baseline"])
  assert {"Baseline", "InSamp", "InSampLPA", "Adv1IS", "Adv5IS", "Adv1ISLPAUS",
          "Adv5ISLPAR18", "InSampLPAR34", "Adv5ISLPAD100", "BiAdvL"} <= set(O.PRESETS)
  ins = O.parse("InSamp").goal
  assert ins.b == O.Sample(O.Lin(0, 1, 150, 10), 0.5, O.Normal(), O.Box())
  assert O.parse("Sample(1, Normal, Box)").goal == O.Sample(1, 1, O.Normal(), O.Box())
  assert O.parse("Adv5IS").goal.a == O.Sub(O.Lin(0, 1, 20, 20), O.IFGSM(5))
  assert O.parse("DiffAI(Box, eps=0.2)").eps == 0.2
  with pytest.raises(ValueError, match="eps"):
    O.parse("DiffAI(Box, eps=0.2)", eps=0.3)


def test_config_and_registry():
  text = "Mix(Point, Sub(Lin(0, 1, 0, 1), Box), 0.5)"
  o = O.from_config({"name": "diffai", "text": text, "eps": 0.2})
  assert o == O.parse(text, eps=0.2)
  assert O.get("diffai", text="InSamp") == O.parse("InSamp")
  assert O.get("dsl") == O.parse("Baseline")
  with pytest.raises(ValueError, match="valid options"):
    O.get("diffai", txt=text)
  cfg = jd.configs.override(jd.configs.base_config(),
                            [f"--config.objective.name=diffai",
                             f"--config.objective.text={text}",
                             "--config.objective.eps=0.2"])
  assert O.from_config(cfg.objective) == o


_BAD = [
    ("__import__('os')", 1, 12, "unexpected character"),
    ("Box().x", 1, 6, "unexpected character"),
    ("lambda x: x", 1, 8, "unexpected"),
    ("(lambda: 1)()", 1, 1, "unexpected"),
    ("Foo(1)", 1, 1, "unknown name 'Foo'"),
    ("Mix(Pont, Box, 0.5)", 1, 5, "did you mean Point"),
    ("Sub(1)", 1, 1, "misses argument"),
    ("Sub(1, Box, 2)", 1, 1, "at most 2 positional"),
    ("Mix(Point, Box)", 1, 1, "misses argument"),
    ("Sub(delta=1, g=Box, h=2)", 1, 21, "no argument 'h'"),
    ("Sub(1, g=Box, g=Box)", 1, 15, "twice"),
    ("Sub(-0.5, Box)", 1, 1, "delta must be >= 0"),
    ("Sub(Lin(-1, 1, 0, 2), Box)", 1, 1, "delta must be >= 0"),
    ("Sample(0.5, 2, Normal, Box)", 1, 1, "r must be <= 1"),
    ("DiffAI(Box, eps=1.5)", 1, 1, "eps must be <= 1"),
    ("DiffAI(Box, eps=-0.1)", 1, 1, "eps must be >= 0"),
    ("Mix(Lin(0, 1, 2, 3), Box, 0.5)", 1, 5, "where a goal is expected"),
    ("Lin(0, 1, 2, 3)", 1, 1, "where a goal is expected"),
    ("Sub(Box, Point)", 1, 5, "where a number or schedule is expected"),
    ("Mix(Point, Box, Normal)", 1, 17, "where a number or schedule is expected"),
    ("Lin(0, 1, Lin(0, 1, 0, 1), 2)", 1, 1, "where a goal is expected"),
    ("Sub(Lin(0, 1, Lin(0, 1, 0, 1), 2), Box)", 1, 15, "number of epochs"),
    ("Sub(\"half\", Box)", 1, 5, "unexpected character"),
    ("Point()()", 1, 8, "unexpected '('"),
    ("Mix(Point, Box, 0.5)(Box)", 1, 21, "unexpected '('"),
    ("Sub(1, Box))", 1, 12, "unexpected ')'"),
    ("Mix(Point,\n    Box, 0.5", 2, 13, "end of text"),
    ("Mix(Point,\n  Bx, 0.5)", 2, 3, "unknown name 'Bx'"),
    ("IFGSM(2.5)", 1, 7, "not an integer"),
    ("Sub(0.5, DiffAI(Box))", 1, 10, "only at the top"),
    ("Sample(1, 1, Mix(Point, Box, 0.5), Box)", 1, 1, "contains a Mix"),
    ("1", 1, 1, "where a goal is expected"),
    ("Mix(Point, Box, lam=0.5, bw=0.5)", 1, 1, "lam together"),
    ("Sub(1, Box, )x", 1, 14, "unexpected"),
    ("", 1, 1, "end of text"),
    ("Sub(1, " * 70 + "Box" + ")" * 70, 1, 1, "nested deeper"),
    ("Box" + " " * 30_000, 1, 1, "characters"),
]


@pytest.mark.parametrize("text,line,column,message", _BAD)
def test_bad_inputs_are_rejected_with_their_position(text, line, column, message):
  with pytest.raises(O.LanguageError) as info:
    O.parse(text)
  e = info.value
  assert isinstance(e, ValueError)
  assert message in str(e)
  if message not in ("nested deeper", "characters"):
    assert (e.line, e.column) == (line, column), str(e)
  assert "expected" in str(e) and "^" in str(e).splitlines()[-1]


def test_nothing_is_evaluated(monkeypatch):
  import builtins

  def forbidden(*args, **kwargs):
    raise AssertionError("the parser evaluated code")

  monkeypatch.setattr(builtins, "eval", forbidden)
  monkeypatch.setattr(builtins, "exec", forbidden)
  for text in ("__import__('os').system('true')", "eval('1')", "exec", "Box.__class__"):
    with pytest.raises(O.LanguageError):
      O.parse(text)
  assert O.parse("Box") == O.parse("Box()")
  with pytest.raises(TypeError):
    O.parse(3)
