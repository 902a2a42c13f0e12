"""LinearPredictor: exactness, warm-up, error ratio, bad input."""

import math

import pytest
import torch

from lightning_asyncpred.prediction import LagEstimator, LinearPredictor, ReplayPredictor


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]


def test_exact_on_constant_velocity_trajectory():
    params = _params()
    w0 = [p.clone() for p in params]
    v = [torch.full_like(p, 0.25) for p in params]
    pred = LinearPredictor(params)
    for t in range(1, 6):  # w_t = w_0 + t v
        for p, a, b in zip(params, w0, v):
            p.copy_(a + t * b)
        pred.observe()
    pred.predict_(horizon=3)
    assert pred.is_predicted
    for p, a, b in zip(params, w0, v):
        torch.testing.assert_close(p, a + 8 * b)  # w_5 + 3 v = w_8
    assert pred.restore_() is True
    for p, a, b in zip(params, w0, v):
        torch.testing.assert_close(p, a + 5 * b, rtol=0, atol=0)
    assert pred.restore_() is False  # idempotent


def test_ema_velocity_converges_to_constant_velocity():
    params = _params()
    pred = LinearPredictor(params, velocity="ema", ema_decay=0.5)
    for _ in range(40):
        for p in params:
            p.add_(0.1)
        pred.observe()
    for v in pred.velocity:
        torch.testing.assert_close(v, torch.full_like(v, 0.1), rtol=1e-5, atol=1e-6)


def test_warmup_ramps_gamma_from_zero_to_one():
    params = [torch.zeros(2)]
    pred = LinearPredictor(params, warmup_steps=4)
    assert pred.gamma() == 0.0
    for t in range(1, 7):
        params[0].add_(1.0)
        pred.observe()
        assert pred.gamma() == pytest.approx(min(1.0, t / 4))
    pred.predict_(2)
    torch.testing.assert_close(params[0], torch.full((2,), 6.0 + 2.0))


def test_error_ratio_below_one_on_smooth_trajectory():
    params = [torch.zeros(50)]
    x = torch.linspace(0, 1, 50)

    def w(t):  # smooth curved trajectory, decelerating like SGD near a minimum
        return torch.sin(x + 0.05 * t) * (1 - math.exp(-0.02 * (t + 1)))

    params[0].copy_(w(0))
    pred = LinearPredictor(params)

    ratios = []
    for t in range(1, 80):
        if t > 1 and pred._probe is None:  # once a velocity exists
            pred.predict_(4, probe=True)
            pred.restore_()
        params[0].copy_(w(t))
        pred.observe()
        if pred.last_error_ratio is not None:
            ratios.append(pred.last_error_ratio)
            pred.last_error_ratio = None
    assert len(ratios) > 5
    assert max(ratios) < 1.0, ratios
    assert sum(ratios) / len(ratios) < 0.5, ratios


def test_error_ratio_above_one_when_prediction_points_the_wrong_way():
    params = [torch.zeros(4)]
    pred = LinearPredictor(params)
    params[0].add_(1.0)
    pred.observe()  # v = +1
    pred.predict_(2, probe=True)
    pred.restore_()
    for _ in range(2):  # the trajectory turns around
        params[0].sub_(1.0)
        pred.observe()
    assert pred.last_error_ratio == pytest.approx(4.0 / 2.0)  # |1+2-(-1)| / |1-(-1)|


def test_only_given_parameters_are_touched():
    layer = torch.nn.BatchNorm1d(3)
    layer.running_mean.fill_(1.0)
    pred = LinearPredictor([p for p in layer.parameters()])
    with torch.no_grad():
        layer.weight.add_(1.0)
    pred.observe()
    pred.predict_(5)
    assert torch.equal(layer.running_mean, torch.ones(3))
    pred.restore_()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"velocity": "momentum"}, "unknown velocity mode 'momentum'"),
        ({"ema_decay": 1.0}, "ema_decay must be in"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0, got -1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinearPredictor(_params(), **kwargs)


def test_bad_horizon_and_double_predict():
    pred = LinearPredictor(_params())
    with pytest.raises(ValueError, match="horizon must be a finite number >= 0, got -1"):
        pred.predict_(-1)
    pred.predict_(1)
    with pytest.raises(RuntimeError, match="twice"):
        pred.predict_(1)
    with pytest.raises(RuntimeError, match="restore_"):
        pred.observe()


def test_state_round_trip_predicts_and_probes_identically():
    """A predictor restored from state_dict (with a probe pending) continues exactly like the original."""
    g = torch.Generator().manual_seed(3)
    steps = [[torch.randn(3, 4, generator=g), torch.randn(5, generator=g)] for _ in range(12)]
    a_params, b_params = _params(), _params()
    a = LinearPredictor(a_params, velocity="ema", ema_decay=0.7, warmup_steps=5)
    for delta in steps[:4]:
        for p, d in zip(a_params, delta):
            p.add_(d)
        a.observe()
    a.predict_(horizon=3, probe=True)  # probe pending, due after 3 more updates
    a.restore_()
    for p, q in zip(b_params, a_params):
        p.copy_(q)  # the model's own state travels separately
    b = LinearPredictor(b_params, velocity="ema", ema_decay=0.7, warmup_steps=5)
    b.load_state_dict(a.state_dict())
    for delta in steps[4:]:
        for pred, params in ((a, a_params), (b, b_params)):
            for p, d in zip(params, delta):
                p.add_(d)
            pred.observe()
            pred.predict_(horizon=2)
        assert all(torch.equal(x, y) for x, y in zip(a_params, b_params))  # same w_hat
        a.restore_(), b.restore_()
        assert a.last_error_ratio == b.last_error_ratio and a.updates == b.updates
    assert a.last_error_ratio is not None


def test_state_of_another_model_is_refused():
    a = LinearPredictor(_params())
    b = LinearPredictor([torch.zeros(3, 4)])
    with pytest.raises(ValueError, match="holds 2 parameters that do not match the model's 1 trainable parameters"):
        b.load_state_dict(a.state_dict())


# ---------------------------------------------------------------- LagEstimator and keyed probes
def test_lag_is_updates_applied_between_read_and_apply():
    lags = LagEstimator(decay=0.5, min_samples=1)
    lags.read(0, updates=3, in_flight=2)
    lags.read(0, updates=9, in_flight=7)  # a second micro-batch of the same step keeps the first reading
    lags.read(1, updates=4, in_flight=2)
    assert lags.applied(0, updates=7) == 4
    assert lags.applied(1, updates=4) == 0  # applied in the same burst as nothing before it: no update in between
    assert lags.applied(5, updates=9) is None  # never read
    # h(F=2) = (0.5 * 4 + 0) / (0.5 + 1)
    assert lags.horizon(2, fallback=99.0) == pytest.approx(2.0 / 1.5)


def test_lag_horizon_per_in_flight_count_nearest_and_fallback():
    lags = LagEstimator(decay=0.9, min_samples=2)
    assert lags.horizon(4, fallback=6.5) == 6.5  # nothing applied yet: the expected staleness
    for key, (f, lag) in enumerate([(1, 1), (1, 1), (4, 2), (4, 4), (6, 9)]):
        lags.read(key, updates=10 * key, in_flight=f)
        lags.applied(key, updates=10 * key + lag)
    assert lags.horizon(1, 0.0) == pytest.approx(1.0)
    assert lags.horizon(4, 0.0) == pytest.approx((0.9 * 2 + 4) / 1.9)  # exponentially weighted mean
    assert lags.horizon(6, 0.0) == pytest.approx((0.9 * 2 + 4) / 1.9)  # F=6 has 1 < min_samples lags: nearest F=4
    assert lags.horizon(2, 0.0) == pytest.approx(1.0)  # nearest is F=1 (distance 1) before F=4 (distance 2)
    lags2 = LagEstimator(decay=0.9, min_samples=2)
    lags2.load_state_dict(lags.state_dict())
    assert [lags2.horizon(f, 0.0) for f in range(8)] == [lags.horizon(f, 0.0) for f in range(8)]


def test_lag_estimator_forgets_gradients_never_applied_beyond_max_pending():
    lags = LagEstimator(max_pending=3)
    for key in range(5):
        lags.read(key, updates=0, in_flight=0)
    assert lags.applied(0, updates=1) is None and lags.applied(1, updates=1) is None  # forgotten, oldest first
    assert lags.applied(4, updates=1) == 1


@pytest.mark.parametrize("kwargs, match", [({"decay": 1.0}, "decay must be in"), ({"min_samples": 0}, "min_samples")])
def test_lag_estimator_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LagEstimator(**kwargs)


def test_keyed_probe_is_measured_against_the_parameters_the_gradient_lands_on():
    params = _params()
    pred = LinearPredictor(params)
    for p in params:
        p.add_(1.0)
    pred.observe()  # v = 1 everywhere
    pred.predict_(horizon=3, probe=True, probe_key=17)  # w_hat = w + 3
    real = [p.clone() for p in pred.real_parameters()]
    pred.restore_()
    for _ in range(5):  # later updates do not resolve a keyed probe
        for p in params:
            p.add_(1.0)
        pred.observe()
    assert pred.probe_key == 17 and pred.last_error_ratio is None
    assert pred.resolve_(16, [r + 1.0 for r in real]) is None  # another gradient
    # it landed on w + 1 (one update in between): ||(w + 3) - (w + 1)|| / ||w - (w + 1)|| = 2
    assert pred.resolve_(17, [r + 1.0 for r in real]) == pytest.approx(2.0)
    assert pred.probe_key is None and pred.last_error_ratio == pytest.approx(2.0)
    pred.predict_(horizon=1, probe=True, probe_key=18)
    pred.restore_()
    state = pred.state_dict()
    assert state["probe"]["key"] == 18
    pred.cancel_probe()
    assert pred.probe_key is None
    pred.load_state_dict(state)
    assert pred.probe_key == 18


def test_replay_predictor_is_the_optimizers_closed_form_and_leaves_the_optimizer_alone():
    """SGD with momentum and weight decay: replaying F gradients from (w, buf) is
    w_F = w - lr sum_j buf_j with buf_j = mu buf_{j-1} + g_j + wd w_{j-1}; the real optimizer state is untouched."""

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    frozen = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([w, frozen], lr=0.1, momentum=0.9, weight_decay=0.01)
    w.grad = torch.randn(5)
    opt.step()
    pred = ReplayPredictor([w, frozen], opt, max_in_flight=2)
    gs = [torch.randn(5) for _ in range(3)]
    for g in gs:  # only the newest max_in_flight = 2 are kept
        pred.submitted([g, None])  # `frozen` has no gradient: the optimizer skips it
    w0, f0, buf = w.detach().clone(), frozen.detach().clone(), opt.state[w]["momentum_buffer"].clone()
    ref, b = w0.clone(), buf.clone()
    for g in gs[1:]:
        b = 0.9 * b + g + 0.01 * ref
        ref = ref - 0.1 * b
    pred.predict_(2)
    assert torch.allclose(w.detach(), ref, atol=1e-6) and torch.equal(frozen.detach(), f0)
    pred.restore_()
    assert torch.equal(w.detach(), w0) and torch.equal(opt.state[w]["momentum_buffer"], buf)
    pred.predict_(1, in_flight=1)  # one in flight: the newest gradient only
    b1 = 0.9 * buf + gs[2] + 0.01 * w0
    assert torch.allclose(w.detach(), w0 - 0.1 * b1, atol=1e-6)
    pred.restore_()
    pred.predict_(1)  # two in flight landing in one update (a burst): their sum, one step (decay and momentum once)
    b1 = 0.9 * buf + gs[1] + gs[2] + 0.01 * w0
    assert torch.allclose(w.detach(), w0 - 0.1 * b1, atol=1e-6)
    pred.restore_()
    pred.predict_(0)  # a lag of 0: it lands with them, on the parameters of now
    assert torch.equal(w.detach(), w0)
    pred.restore_()
    # a resumed predictor replays the same gradients
    other = ReplayPredictor([w, frozen], opt, max_in_flight=2)
    other.load_state_dict(pred.state_dict())
    other.predict_(2)
    assert torch.allclose(w.detach(), ref, atol=1e-6)
    other.restore_()
    # the replay keeps no velocity (two copies of the model fewer); its state cannot resume a linear predictor
    assert pred.velocity == [] and pred.state_dict()["velocity"] == []
    with pytest.raises(ValueError, match=r"saved by LinearPrediction\(method='replay'\); resume with the same method"):
        LinearPredictor([w, frozen]).load_state_dict(pred.state_dict())
    with pytest.raises(ValueError, match="do not match the model's 2 trainable parameters"):
        other.load_state_dict({**pred.state_dict(), "in_flight": [[torch.zeros(4), None]]})
    # an overflowed gradient (mixed precision) is no step, as the scaler skips the update that applies it
    pred.submitted([torch.full((5,), float("inf")), None])
    pred.predict_(1, in_flight=1)
    assert torch.equal(w.detach(), w0)
    pred.restore_()


def test_replay_predictor_copies_a_submitted_gradient_unless_it_is_handed_over():
    """``submitted`` copies (the caller may reuse its tensors); ``copy=False`` keeps the caller's tensors (the
    callback hands over the ones ``submitted_gradient()`` assembled for it): no second copy of the model's size."""
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=0.5)
    kept, handed = torch.ones(3), torch.ones(3)
    pred = ReplayPredictor([w], opt, max_in_flight=2)
    pred.submitted([kept])
    kept.fill_(7.0)  # the caller reuses its buffer: the gradient in flight is still the one submitted
    pred.predict_(1)
    assert torch.equal(w.detach(), torch.full((3,), -0.5))
    pred.restore_()
    pred.submitted([handed], copy=False)
    handed.fill_(3.0)  # kept, not copied: the replay steps with what the tensor holds
    pred.predict_(1, in_flight=1)
    assert torch.equal(w.detach(), torch.full((3,), -1.5))
    pred.restore_()


def test_replay_predictor_refuses_an_optimizer_over_other_parameters():

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"the optimizer steps 1 tensors that are not among the predicted parameters \(shapes \[\(4, 3\)\]\)"):
        ReplayPredictor([a], torch.optim.SGD([a, b], lr=0.1), 2)
    with pytest.raises(ValueError, match="max_in_flight must be an integer >= 0, got -1"):
        ReplayPredictor([a], torch.optim.SGD([a], lr=0.1), -1)
    with pytest.raises(ValueError, match="expected a gradient for each of the 1 parameters, got 2"):
        ReplayPredictor([a], torch.optim.SGD([a], lr=0.1), 2).submitted([torch.zeros(2), torch.zeros(2)])
