"""N virtual workers around the p2p owner (exchange/virtual.py) and the owner's look-ahead (exchange/owner.py)."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_asyncpred.exchange.owner import ShardOwner
from lightning_asyncpred.exchange.virtual import VirtualWorkers, parse_speeds
from lightning_asyncpred.remedies import momentum_horizon

DIM = 6


def _problem(seed: int = 0):
    """A least-squares problem: the gradient of 0.5 ||A w - b||^2 on the rows of one batch."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(64, DIM, generator=gen, dtype=torch.float64), torch.randn(64, generator=gen, dtype=torch.float64)

    def grad(w: torch.Tensor, step: int) -> torch.Tensor:
        rows = slice((8 * step) % 64, (8 * step) % 64 + 8)
        return a[rows].T @ (a[rows] @ w - b[rows]) / 8

    return grad


def _owner(n: int, lr: float = 0.05, momentum: float = 0.9, **kwargs):
    w = torch.zeros(DIM, dtype=torch.float64)
    opt = torch.optim.SGD([w], lr=lr, momentum=momentum, **kwargs)
    return ShardOwner(opt, [w], [0], world_size=n), opt, w


def _run(workers: VirtualWorkers, grad, steps: int) -> list[int]:
    order = []
    for t in range(steps):
        worker, params = workers.start()
        order.append(worker)
        workers.finish(grad(params, t))
    workers.drain()
    return order


def test_one_worker_at_depth_1_is_synchronous_sgd():
    grad = _problem()
    owner, _, _ = _owner(1)
    _run(VirtualWorkers(owner, 1, depth=1), grad, 30)
    w = torch.zeros(DIM, dtype=torch.float64, requires_grad=False)
    ref = torch.optim.SGD([w], lr=0.05, momentum=0.9)
    for t in range(30):
        w.grad = grad(w.detach().clone(), t)
        ref.step()
    assert torch.equal(owner.flat, w)


@pytest.mark.parametrize("n,depth", [(4, 1), (4, 2), (8, 2), (3, 4)])
def test_equal_speeds_give_every_arrival_depth_times_n_minus_1_staleness(n, depth):
    owner, _, _ = _owner(n)
    workers = VirtualWorkers(owner, n, depth=depth)
    order = _run(workers, _problem(), 20 * n)
    assert order[: 2 * n] == list(range(n)) * 2  # round robin
    hist = workers.stats.histogram
    # before a worker's first reply it reads the initial parameters (less stale); afterwards always d N - 1
    steady = depth * n - 1
    assert workers.stats.max == steady
    assert hist[steady] == 20 * n - sum(hist[:steady])
    assert sum(hist[:steady]) <= depth * n


def test_a_straggler_contributes_in_proportion_to_its_speed():
    owner, _, _ = _owner(4)
    workers = VirtualWorkers(owner, 4, depth=2, speeds="straggler:2")
    order = _run(workers, _problem(), 700)
    counts = [order.count(i) for i in range(4)]
    assert counts[3] / counts[0] == pytest.approx(0.5, abs=0.02)
    assert workers.owner.arrivals == 700
    assert workers.owner.rounds == 175


def test_arrivals_are_applied_in_time_order_and_a_worker_computes_at_its_reply():
    owner, _, _ = _owner(2, momentum=0.0)
    workers = VirtualWorkers(owner, 2, depth=1, speeds=[1.0, 3.0], seed=3)
    seen = []
    workers.before_apply = lambda worker, step: seen.append((workers.time, worker, step))
    for t in range(40):
        worker, params = workers.start()
        # depth 1: a worker reads the reply to its own last step (the initial master before it has one)
        if workers.steps(worker):
            assert torch.equal(params, workers._replies[worker][workers.steps(worker) - 1][1])
        workers.finish(torch.ones(DIM, dtype=torch.float64) * (t + 1))
    workers.drain()
    assert len(seen) == 40 and owner.arrivals == 40
    for worker in (0, 1):
        steps = [s for _, w, s in seen if w == worker]
        assert steps == sorted(steps)  # each worker's gradients arrive in its order


def test_state_dict_resumes_bit_identically():
    grad = _problem(1)
    a_owner, _, _ = _owner(3, lr=0.02)
    a = VirtualWorkers(a_owner, 3, depth=2, speeds="jitter:0.5", seed=7)
    for t in range(25):
        worker, params = a.start()
        a.finish(grad(params, t))
    state, rounds, opt_state = a.state_dict(), a_owner.round_state(), a_owner.state_dict()
    flat = a_owner.flat.clone()
    for t in range(25, 60):
        worker, params = a.start()
        a.finish(grad(params, t))
    a.drain()

    b_owner, _, w = _owner(3, lr=0.02)
    with torch.no_grad():
        w.copy_(flat)
    b_owner = ShardOwner(b_owner.user, [w], [0], world_size=3)
    b_owner.flat.copy_(flat)
    b_owner.load_round_state(rounds)
    b_owner.load_state(opt_state)
    b = VirtualWorkers(b_owner, 3, depth=2, speeds="jitter:0.5", seed=0)
    b.load_state_dict(state)
    for t in range(25, 60):
        worker, params = b.start()
        b.finish(grad(params, t))
    b.drain()
    assert torch.equal(a_owner.flat, b_owner.flat)
    assert a.stats.histogram == b.stats.histogram
    with pytest.raises(ValueError, match="resume with the same workers and depth"):
        VirtualWorkers(_owner(3)[0], 3, depth=1).load_state_dict(state)


def test_bad_arguments_are_clear_errors():
    owner, _, _ = _owner(4)
    with pytest.raises(ValueError, match="world_size=workers"):
        VirtualWorkers(owner, 3)
    with pytest.raises(ValueError, match="depth"):
        VirtualWorkers(owner, 4, depth=0)
    for bad in ("fast", "jitter:-1", "straggler:0", "straggler:x", [], [1.0, -2.0]):
        with pytest.raises(ValueError, match="speed model|step times"):
            parse_speeds(bad)
    assert parse_speeds([0.5, 2]).samples == (0.5, 2.0)
    workers = VirtualWorkers(owner, 4)
    with pytest.raises(RuntimeError, match="finish"):
        workers.finish(torch.zeros(DIM))
    workers.start()
    with pytest.raises(RuntimeError, match="twice"):
        workers.start()


# ---------------------------------------------------------------------------------------------- the look-ahead
def test_momentum_horizon_is_msnag_c_of_d():
    # REFERENCES: at mu 0.9, c = 3.1 / 5.1 / 7.3 for D = 4 / 8 / 16
    assert [round(momentum_horizon(d, 0.9), 1) for d in (4, 8, 16)] == [3.1, 5.1, 7.3]
    assert momentum_horizon(1, 0.9) == pytest.approx(0.9)
    assert momentum_horizon(2.5, 1.0) == 2.5 and momentum_horizon(3, 0.0) == 0.0
    with pytest.raises(ValueError, match="momentum"):
        momentum_horizon(2, 1.5)


@pytest.mark.parametrize("mode,velocity", [("linear", "step"), ("momentum", "step"), ("linear", "recent"),
                                           ("momentum", "recent")])
def test_lookahead_replies_the_master_plus_c_times_one_rounds_movement_and_never_changes_the_masters(mode, velocity):
    grad = _problem(2)
    plain, _, _ = _owner(4)
    ahead, _, _ = _owner(4)
    ahead.set_lookahead(mode, velocity=velocity)
    assert ahead.reply is not ahead.flat
    gen = torch.Generator().manual_seed(0)
    previous, last = ahead.base.clone(), torch.zeros(DIM, dtype=torch.float64)
    for t in range(40):
        g = grad(torch.randn(DIM, generator=gen, dtype=torch.float64), t)
        stale = int(torch.randint(0, 9, (1,), generator=gen))
        plain.apply(g, staleness=stale)
        reply = ahead.apply(g, staleness=stale)
        assert torch.equal(ahead.flat, plain.flat)  # the masters are the same with or without look-ahead
        if ahead.count == 0:  # a round just completed: u is its step
            last = ahead.base - previous
            previous = ahead.base.clone()
        d = ahead.lag
        c = d if mode == "linear" else momentum_horizon(d, 0.9)
        # "recent": the preview so far plus the rest of the last real step
        v = last if velocity == "step" else (ahead.flat - ahead.base) + (1 - ahead.count / 4) * last
        torch.testing.assert_close(reply, ahead.flat + c * v, rtol=1e-9, atol=1e-12)
    # the measured D: a running mean of tau / N
    assert 0 < ahead.lag < 8 / 4
    # its memory: the reply and the last step, two more copies of the shard
    assert ahead.buffer_bytes() == plain.buffer_bytes() + 2 * ahead.flat.numel() * ahead.flat.element_size()


def test_recent_velocity_is_the_movement_over_the_last_n_arrivals_when_the_preview_moves_linearly():
    # equal arrivals: SGD's preview moves by the same share at every arrival, so (flat - w_r) + (1 - k/N) u is
    # exactly the master now minus the master N arrivals ago
    owner, _, _ = _owner(4)
    owner.set_lookahead("linear", horizon=1.0)
    history = [owner.flat.clone()]
    g = torch.linspace(-1, 1, DIM, dtype=torch.float64)
    for t in range(30):
        reply = owner.apply(g, staleness=3)
        history.append(owner.flat.clone())
        if t >= 8:
            torch.testing.assert_close(reply, owner.flat + (history[-1] - history[-5]), rtol=1e-12, atol=1e-12)


def test_lookahead_with_a_fixed_horizon_and_bad_settings():
    owner, opt, _ = _owner(2)
    owner.set_lookahead("momentum", horizon=1)
    assert owner.lookahead_coefficients() == [pytest.approx(0.9)]  # DANA-Zero's one step ahead: c = mu
    with pytest.raises(ValueError, match="lookahead must be"):
        owner.set_lookahead("quadratic")
    with pytest.raises(ValueError, match="number of rounds"):
        owner.set_lookahead("linear", horizon=-1)
    with pytest.raises(ValueError, match="velocity must be 'recent' or 'step'"):
        owner.set_lookahead("linear", velocity="fast")
    w = torch.zeros(3)
    plain = ShardOwner(torch.optim.Adagrad([w], lr=0.1), [w], [0], world_size=2)
    with pytest.raises(ValueError, match="Adagrad does not have; use lookahead='linear'"):
        plain.set_lookahead("momentum")
    plain.set_lookahead("linear")


def test_lookahead_state_survives_save_and_load_mid_round():
    grad = _problem(3)
    a, _, _ = _owner(3)
    a.set_lookahead("momentum")
    for t in range(8):
        a.apply(grad(a.reply.clone(), t), staleness=t % 5)
    state, opt_state, flat = a.round_state(), a.state_dict(), a.flat.clone()
    b, _, w = _owner(3)
    with torch.no_grad():
        w.copy_(flat)
    b = ShardOwner(b.user, [w], [0], world_size=3)
    b.set_lookahead("momentum")
    b.flat.copy_(flat)
    b.load_state(opt_state)
    b.load_round_state(state)
    torch.testing.assert_close(b.reply, a.reply, rtol=0, atol=0)
    for t in range(8, 20):
        ra = a.apply(grad(a.reply.clone(), t), staleness=t % 5)
        rb = b.apply(grad(b.reply.clone(), t), staleness=t % 5)
        assert torch.equal(ra, rb)
    assert math.isclose(a.lag, b.lag)


# ---------------------------------------------------------------------------------------------- async_pred_sim(workers=N)
def _sim_trainer(tmp_path, strategy, callbacks=(), **kwargs):
    from tests.helpers import trainer

    return trainer(tmp_path, callbacks, strategy=strategy, limit_val_batches=0, **kwargs)


def test_async_pred_sim_with_workers_is_the_virtual_workers_around_the_p2p_owner(tmp_path):
    """The Lightning strategy and the pure engine driven by hand on the same batches end on the same masters."""
    from torch.func import functional_call

    from lightning_asyncpred import SimulatedAsyncStrategy
    from lightning_asyncpred.exchange.buckets import flat_views
    from tests.helpers import model_and_data

    model, data = model_and_data(lr=0.05, momentum=0.9)
    strategy = SimulatedAsyncStrategy(workers=4, depth=2, speeds="jitter:0.5", seed=3, lookahead="momentum")
    t = _sim_trainer(tmp_path, strategy, max_steps=30)
    t.fit(model, data)
    ex = t.strategy.exchange
    assert ex.submitted == ex.applied == 30 and ex.owner.rounds == 7  # 30 arrivals: 7 rounds of 4, 2 in the 8th
    assert t.strategy.staleness_stats.max == 2 * 4 - 1 + 2  # jitter reorders arrivals a little around d N - 1

    ref_model, ref_data = model_and_data(lr=0.05, momentum=0.9)
    ref_data.setup("fit")
    params = [p for p in ref_model.parameters()]
    names = [n for n, _ in ref_model.named_parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    owner = ShardOwner(opt, params, list(range(len(params))), world_size=4)
    owner.set_lookahead("momentum")
    workers = VirtualWorkers(owner, 4, depth=2, speeds="jitter:0.5", seed=3)
    loader = iter(ref_data.train_dataloader())
    for _ in range(30):
        _, read = workers.start()
        x, y = next(loader)
        w = read.clone().requires_grad_()
        loss = torch.nn.functional.cross_entropy(functional_call(ref_model, dict(zip(names, flat_views(w, params))), (x,)), y)
        (g,) = torch.autograd.grad(loss, w)
        workers.finish(g)
    workers.drain()
    final = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(final, owner.flat, rtol=1e-5, atol=1e-6)
    assert workers.stats.histogram == t.strategy.staleness_stats.histogram


def test_async_pred_sim_with_workers_resumes_exactly_from_a_mid_run_checkpoint(tmp_path):
    from lightning_asyncpred import SimulatedAsyncStrategy
    from tests.helpers import model_and_data

    def strategy():
        return SimulatedAsyncStrategy(workers=3, depth=2, speeds="straggler:2", lookahead="linear")

    model, data = model_and_data(lr=0.05, momentum=0.9)
    _sim_trainer(tmp_path / "a", strategy(), max_steps=20).fit(model, data)
    straight = [p.detach().clone() for p in model.parameters()]

    # the same run with a checkpoint after step 11: saving changes nothing
    model, data = model_and_data(lr=0.05, momentum=0.9)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=11, save_top_k=-1)
    _sim_trainer(tmp_path / "b", strategy(), max_steps=20, callbacks=[ckpt_cb], enable_checkpointing=True).fit(model, data)
    for a, b in zip(straight, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=11.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["async_pred"]["exchange"]["transport"] == "virtual"
    assert saved["async_pred"]["exchange"]["submitted"] - saved["async_pred"]["exchange"]["applied"] > 0  # in flight

    # resumed from it: the rest of the run is the same
    model, data = model_and_data(lr=0.05, momentum=0.9)
    _sim_trainer(tmp_path / "c", strategy(), max_steps=20).fit(model, data, ckpt_path=ckpt)
    for a, b in zip(straight, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(workers=4, staleness=2), "pass one or the other"),
    (dict(depth=2), "pass workers=N > 1"),
    (dict(workers=4, speeds="warp:9"), "unknown speed model"),
    (dict(workers=4, lookahead="far"), "lookahead must be"),
    (dict(lookahead="momentum"), "pass workers=N > 1"),
    (dict(workers=0), "workers"),
])
def test_async_pred_sim_worker_arguments_are_checked(kwargs, match):
    from lightning_asyncpred import SimulatedAsyncStrategy

    with pytest.raises(ValueError, match=match):
        SimulatedAsyncStrategy(**kwargs)


def test_lookahead_auto_is_linear_and_linear_prediction_is_refused_with_virtual_workers(tmp_path):
    from lightning_asyncpred import LinearPrediction, SimulatedAsyncStrategy
    from tests.helpers import model_and_data

    model, data = model_and_data(lr=0.05, momentum=0.9)
    t = _sim_trainer(tmp_path, SimulatedAsyncStrategy(workers=2), max_steps=4)
    t.fit(model, data)
    assert t.strategy.exchange.owner.lookahead == "linear"  # auto: the best rule of the sweep
    assert t.strategy.exchange.owner.lookahead_velocity == "recent"

    class AdagradClassifier(type(model)):
        def configure_optimizers(self):
            return torch.optim.Adagrad(self.parameters(), lr=0.01)

    model, data = model_and_data()
    model = AdagradClassifier(arch="digits_cnn", lr=0.01)
    t = _sim_trainer(tmp_path, SimulatedAsyncStrategy(workers=2, lookahead="momentum"), max_steps=4)
    with pytest.raises(ValueError, match="Adagrad does not have; use lookahead='linear'"):
        t.fit(model, data)

    model, data = model_and_data()
    t = _sim_trainer(tmp_path, SimulatedAsyncStrategy(workers=2, lookahead=None), max_steps=4)
    t.fit(model, data)
    assert t.strategy.exchange.owner.lookahead is None and t.strategy.exchange.owner.reply is t.strategy.exchange.owner.flat

    model, data = model_and_data()
    t = _sim_trainer(tmp_path, SimulatedAsyncStrategy(workers=3), callbacks=[LinearPrediction()], max_steps=4)
    with pytest.raises(ValueError, match="workers=3 virtual workers .* the owner predicts for them instead"):
        t.fit(model, data)
