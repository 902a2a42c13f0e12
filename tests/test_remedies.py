"""Staleness remedies: their math on tiny tensors, and ``StalenessRemedies`` differentially under ``async_pred_sim``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import pytorch_lightning as pl

from lightning_asyncpred import SimulatedAsyncStrategy, StalenessRemedies
from lightning_asyncpred.exchange import ShardOwner
from lightning_asyncpred.remedies import (DelayCompensation, GapAware, corrected_momentum, delay_adaptive_scale,
                                          spike_compensation,
                                          implicit_momentum, staleness_scale)
from tests.helpers import model_and_data, real_params, trainer


def test_staleness_aware_scale():
    assert [staleness_scale(t) for t in (0, 1, 2, 4)] == [1.0, 1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="staleness must be >= 0, got -1"):
        staleness_scale(-1)


def test_momentum_correction_keeps_the_total_momentum():
    assert implicit_momentum(0) == 0.0 and implicit_momentum(4) == pytest.approx(0.8)
    assert corrected_momentum(0.9, 4) == pytest.approx(0.1)
    assert corrected_momentum(0.9, 0) == 0.9
    assert corrected_momentum(0.5, 9) == 0.0  # never negative


def test_delay_compensation_is_the_taylor_correction():
    g = [torch.tensor([1.0, -2.0, 0.5])]
    now, read = [torch.tensor([1.0, 1.0, 1.0])], [torch.tensor([0.0, 2.0, 1.0])]
    DelayCompensation(lam=0.5).apply_(g, now, read)
    # g + 0.5 * g^2 * (now - read) = [1 + 0.5, -2 + 0.5*4*(-1), 0.5 + 0]
    assert torch.equal(g[0], torch.tensor([1.5, -4.0, 0.5]))


def test_adaptive_delay_compensation_divides_by_the_root_mean_square():
    dc = DelayCompensation(lam=0.1, adaptive=True, beta=0.5, eps=0.0)
    g = [torch.tensor([2.0])]
    dc.apply_(g, [torch.tensor([1.0])], [torch.tensor([0.0])])
    # m = 0.5 * 0 + 0.5 * 4 = 2; g + 0.1 * 4 * 1 / sqrt(2)
    assert g[0].item() == pytest.approx(2.0 + 0.4 / 2**0.5)
    state = dc.state_dict()
    other = DelayCompensation(lam=0.1, adaptive=True, beta=0.5, eps=0.0)
    other.load_state_dict(state)
    assert torch.equal(other.mean_square[0], dc.mean_square[0])


def test_delay_adaptive_scale_damps_only_beyond_n():
    assert [delay_adaptive_scale(t, 4) for t in (0, 3, 4, 8, 16)] == [1.0, 1.0, 1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        delay_adaptive_scale(-1, 4)


def test_gap_aware_divides_by_one_plus_the_gap_in_typical_steps():
    ga = GapAware(beta=0.5, eps=0.0)
    g = [torch.tensor([2.0, -1.0])]
    ga.apply_(g, [torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 0.0])], [0.5])
    # E[g^2] = 0.5 * g^2, bias 1 - 0.5 = 0.5 -> sqrt(g^2) = |g|; C = 0.5 |g| = [1, 0.5]; gap = [1, 0]
    assert torch.equal(g[0], torch.tensor([2.0 / (1 + 1 / 1.0), -1.0]))
    other = GapAware(beta=0.5, eps=0.0)
    other.load_state_dict(ga.state_dict())
    assert other.updates == 1 and torch.equal(other.mean_square[0], ga.mean_square[0])


def test_owner_applies_delay_adaptive_and_gap_aware_to_arrivals():
    owner = _owner(lr=1.0)
    owner.set_remedies(delay_adaptive=True)
    owner.apply(torch.tensor([1.0, 1.0, 1.0]), staleness=2)  # N = 1: tau 2 -> g / 2
    assert torch.equal(owner.flat, torch.tensor([0.5, 1.5, -1.5]))
    with pytest.raises(ValueError, match="choose one"):
        owner.set_remedies(staleness_lr=True, delay_adaptive=True)
    with pytest.raises(ValueError, match="history of at least 1"):
        owner.set_remedies(gap_aware=GapAware())
    owner = _owner(lr=1.0)
    owner.set_remedies(gap_aware=GapAware(beta=0.0, eps=0.0), history=2)
    owner.apply(torch.tensor([1.0, 1.0, 1.0]), staleness=0)  # no gap: a plain step
    assert torch.equal(owner.flat, torch.tensor([0.0, 1.0, -2.0]))
    # read one arrival ago: gap = |w_now - w_read| = 1 = one typical step (lr |g| = 1): g / 2
    owner.apply(torch.tensor([1.0, 1.0, 1.0]), staleness=1)
    assert torch.equal(owner.flat, torch.tensor([-0.5, 0.5, -2.5]))


def test_bad_remedy_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"lam must be a number >= 0, got -1"):
        DelayCompensation(lam=-1)
    with pytest.raises(ValueError, match=r"nothing on: set staleness_lr, dc_lambda, momentum_correction, delay_adaptive"):
        StalenessRemedies()
    with pytest.raises(ValueError, match=r"dc_adaptive=True needs dc_lambda"):
        StalenessRemedies(dc_adaptive=True)


def _owner(lr=0.5):
    w = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)]
    return ShardOwner(torch.optim.SGD(w, lr=lr), w, [0, 1])


def test_owner_applies_delay_compensation_with_the_master_the_worker_read():
    owner = _owner()
    owner.set_remedies(dc=DelayCompensation(lam=0.5), history=2)
    w0 = owner.flat.clone()
    g1 = torch.tensor([1.0, -1.0, 2.0])
    w1 = owner.apply(g1.clone(), staleness=0).clone()  # read the current master: no correction
    assert torch.equal(w1, w0 - 0.5 * g1)
    g2 = torch.tensor([2.0, 1.0, -1.0])
    w2 = owner.apply(g2.clone(), staleness=1).clone()  # read w0, one update ago
    assert torch.allclose(w2, w1 - 0.5 * (g2 + 0.5 * g2 * g2 * (w1 - w0)))
    g3 = torch.tensor([1.0, 1.0, 1.0])
    w3 = owner.apply(g3.clone(), staleness=2).clone()  # read w0 again, two updates ago
    assert torch.allclose(w3, w2 - 0.5 * (g3 + 0.5 * g3 * g3 * (w2 - w0)))
    assert (owner.dc_applied, owner.dc_skipped) == (3, 0)
    owner.apply(g3.clone(), staleness=3)  # older than the history of 2 masters: applied uncorrected, counted
    assert owner.dc_skipped == 1


def test_owner_applies_the_staleness_aware_lr_in_rounds():
    owner = _owner()  # one worker: every arrival is a round
    owner.set_remedies(staleness_lr=True)
    for _ in range(4):
        owner.apply(torch.zeros(3))
    w0 = owner.flat.clone()
    g = torch.tensor([4.0, 4.0, 4.0])
    after = owner.apply(g.clone(), staleness=4).clone()  # read 4 arrivals (4 rounds) ago
    assert torch.allclose(after, w0 - 0.5 * g / 4)
    with pytest.raises(ValueError, match="history of at least 1"):
        owner.set_remedies(dc=DelayCompensation(), history=0)


def test_gradient_remedies_under_p2p_are_installed_at_the_owners():
    owner = _owner()
    exchange = SimpleNamespace(owner=owner, max_staleness=2)
    fake = SimpleNamespace(strategy=SimpleNamespace(expected_staleness=2.0, _exchange_returns_parameters=True,
                                                    exchange=exchange, arrivals_per_round=4),
                           optimizers=[owner.user])
    StalenessRemedies(staleness_lr=True, dc_lambda=0.1, dc_adaptive=True).on_fit_start(fake, None)
    assert owner.staleness_lr and owner.dc.lam == 0.1 and owner.dc.adaptive
    assert owner._history.maxlen == 4 * (2 + 1) + 1  # every worker's steps in flight, in owner updates


class _LastStep(pl.Callback):
    """The parameters after the last training step (before the end of fit drains what is in flight)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params = real_params(pl_module)


def _fit(tmp_path, callbacks, lr, staleness=2):
    model, data = model_and_data(lr=lr, momentum=0.0)
    last = _LastStep()
    t = trainer(tmp_path, [*callbacks, last], strategy=SimulatedAsyncStrategy(staleness=staleness), max_steps=10,
                limit_val_batches=0)
    t.fit(model, data)
    return last.params


def test_staleness_aware_lr_at_fixed_staleness_equals_dividing_the_lr(tmp_path):
    # plain SGD, every gradient exactly 2 updates late: g / 2 with lr is lr / 2 with g (until the end of fit drains
    # the gradients in flight, which are less stale)
    with_remedy = _fit(tmp_path / "a", [StalenessRemedies(staleness_lr=True)], lr=0.1)
    half_lr = _fit(tmp_path / "b", [], lr=0.05)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(with_remedy, half_lr))
    assert not all(torch.equal(a, b) for a, b in zip(with_remedy, _fit(tmp_path / "c", [], lr=0.1)))


def test_delay_compensation_with_lambda_0_changes_nothing_and_with_lambda_it_does(tmp_path):
    plain = _fit(tmp_path / "a", [], lr=0.1)
    zero = _fit(tmp_path / "b", [StalenessRemedies(dc_lambda=0.0)], lr=0.1)
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    dc = _fit(tmp_path / "c", [StalenessRemedies(dc_lambda=2.0)], lr=0.1)
    assert not all(torch.equal(a, b) for a, b in zip(plain, dc))


def test_momentum_correction_sets_the_group_momentum_from_the_expected_staleness(tmp_path):
    model, data = model_and_data(lr=0.05, momentum=0.9)
    t = trainer(tmp_path, [StalenessRemedies(momentum_correction=True)], strategy=SimulatedAsyncStrategy(staleness=4),
                max_steps=3, limit_val_batches=0)
    t.fit(model, data)
    assert all(g["momentum"] == pytest.approx(0.1) for g in t.optimizers[0].param_groups)  # 0.9 - 4/5


def test_remedies_on_real_ranks_keep_allreduce_replicas_identical_and_resume_exactly(tmp_path):
    from tests.dist_helpers import assert_balanced, assert_identical_replicas, params, results, run

    full = tmp_path / "full"
    run(full, "--max-staleness", "2", "--max-steps", "24", "--prediction", "--remedies", "--ckpt-every", "7")
    assert_balanced(results(full))
    assert_identical_replicas(full)  # the same corrections on identical inputs on every rank
    resumed = tmp_path / "resumed"
    run(resumed, "--max-staleness", "2", "--max-steps", "24", "--prediction", "--remedies",
        "--resume", str(full / "ckpt" / "step=14.ckpt"))
    a, b = params(full, 0), params(resumed, 0)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the read parameters and DC state travel in the checkpoint


def test_owner_only_remedies_reach_the_virtual_workers_owner_and_are_refused_elsewhere(tmp_path):
    model, data = model_and_data(lr=0.05, momentum=0.9)
    t = trainer(tmp_path, [StalenessRemedies(delay_adaptive=True, gap_aware=True)],
                strategy=SimulatedAsyncStrategy(workers=4), max_steps=12, limit_val_batches=0)
    t.fit(model, data)
    owner = t.strategy.exchange.owner
    assert owner.delay_adaptive and owner.gap_aware is not None and owner.gap_aware.updates == 12
    assert owner._history.maxlen == 4 * (1 + 1) + 1  # depth 1: N (depth + 1) + 1 past masters
    model, data = model_and_data()
    t = trainer(tmp_path, [StalenessRemedies(gap_aware=True)], strategy=SimulatedAsyncStrategy(staleness=2), max_steps=2)
    with pytest.raises(ValueError, match="act at the owners of async_pred .* use staleness_lr or dc_lambda there"):
        t.fit(model, data)


def test_spike_compensation_coefficients():
    """(a, b) = (mu^D, (1 - mu^D) / (1 - mu)): a + b = sum_{k<=D} mu^k, what the gradient would have moved by now."""
    assert spike_compensation(0.9, 0) == (1.0, 0.0)
    a, b = spike_compensation(0.9, 2)
    assert (a, b) == (pytest.approx(0.81), pytest.approx(1.9)) and a + b == pytest.approx(1 + 0.9 + 0.81)
    assert spike_compensation(1.0, 3) == (1.0, 3.0) and spike_compensation(0.0, 2) == (0.0, 1.0)
    with pytest.raises(ValueError, match="delay must be >= 0, got -1"):
        spike_compensation(0.9, -1)
    with pytest.raises(ValueError, match="momentum must be in"):
        spike_compensation(1.5, 1)


def test_a_late_gradient_with_spike_compensation_catches_up_with_synchronous_momentum():
    """One gradient e, then zeros: synchronously it has moved w by lr e sum_{k<=D+j} mu^k after D + j steps; applied
    D steps late with the compensated step, after j more steps, by the same."""
    mu, lr, D, e = 0.9, 0.1, 3, torch.tensor([1.0])
    a, b = spike_compensation(mu, D)
    v = e.clone()  # torch's SGD: v <- mu v + e, w <- w - lr v; the compensated step: w <- w - lr (a v + b e)
    moved = lr * (a * v + b * e)
    for j in range(1, 6):
        v = mu * v
        moved = moved + lr * a * v
        assert float(moved) == pytest.approx(lr * sum(mu**k for k in range(D + j + 1)))


class _Steps(pl.Callback):
    """Every applied step: the parameters and momentum buffer before it, the gradient it used (after clipping: the
    optimizer leaves .grad as it took it), the parameters and buffer after it, the learning rate before and after."""

    def __init__(self):
        self.steps, self._before = [], None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        opt = trainer.optimizers[0]
        p = next(pl_module.parameters())
        buf = opt.state.get(p, {}).get("momentum_buffer")
        self._before = (p.detach().clone(), None if buf is None else buf.clone(), trainer.strategy.last_staleness,
                        opt.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._before is not None:
            p = next(pl_module.parameters())
            w, buf, tau, lr = self._before
            after = trainer.optimizers[0].state[p]["momentum_buffer"]
            self.steps.append((w, p.grad.detach().clone(), buf, tau, lr, p.detach().clone(), after.clone(),
                               trainer.optimizers[0].param_groups[0]["lr"]))
            self._before = None


def test_spike_compensation_steps_w_minus_lr_a_v_plus_b_e(tmp_path):
    """Under async_pred_sim (every gradient 2 steps late), SGD momentum 0.9, weight decay and gradient clipping: torch's
    buffer evolves as always (v = mu v + e), the parameters move by lr (a v + b e) with e = g + wd w (g as clipped),
    and the learning rate is never changed."""
    mu, lr, wd = 0.9, 0.05, 1e-3
    model, data = model_and_data(lr=lr, momentum=mu, weight_decay=wd)
    steps = _Steps()
    t = trainer(tmp_path, [StalenessRemedies(spike_compensation=True), steps], gradient_clip_val=0.05,
                strategy=SimulatedAsyncStrategy(staleness=2), max_steps=8, limit_val_batches=0)
    t.fit(model, data)
    applied = [s for s in steps.steps if s[3]]
    assert len(applied) >= 5
    for w, g, buf, tau, lr_seen, w_after, buf_after, lr_after in applied:
        e = g + wd * w
        a, b = spike_compensation(mu, tau)
        v = e if buf is None else mu * buf + e
        assert torch.allclose(buf_after, v, atol=1e-7)
        assert torch.allclose(w_after, w - lr * (a * v + b * e), atol=1e-6)
        assert lr_seen == lr_after == lr


def test_spike_compensation_is_refused_at_the_owners_and_without_heavy_ball_momentum(tmp_path):
    model, data = model_and_data(lr=0.05, momentum=0.9)
    t = trainer(tmp_path, [StalenessRemedies(spike_compensation=True)], strategy=SimulatedAsyncStrategy(workers=4),
                max_steps=2, limit_val_batches=0)
    with pytest.raises(ValueError, match="spike_compensation=True\\) acts where the replica applies the gradients"):
        t.fit(model, data)

    class Adam(type(model)):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    t = trainer(tmp_path, [StalenessRemedies(spike_compensation=True)], strategy=SimulatedAsyncStrategy(staleness=2),
                max_steps=2, limit_val_batches=0)
    with pytest.raises(ValueError, match="needs torch.optim.SGD-style heavy-ball momentum .* got Adam"):
        t.fit(Adam(arch="digits_cnn"), data)
