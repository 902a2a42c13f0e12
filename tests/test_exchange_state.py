"""The exchange contract's checkpoint part, one process: SimulatedExchange state and GradientBuckets.place."""

import pytest
import torch

from lightning_asyncpred.exchange import GradientBuckets, SimulatedExchange


def _grad(t):
    return [torch.full((4,), float(t)), torch.full((2,), -float(t))]


def _play(ex, steps):
    out = []
    for t in steps:
        ex.submit(t, _grad(t))
        out += [(r.step, r.staleness, r.buckets[0][0].item()) for r in ex.ready()]
    return out


def test_simulated_state_round_trip_continues_the_staleness_draws():
    original = SimulatedExchange("uniform:0:4", seed=7)
    _play(original, range(10))
    state = original.state_dict()
    assert original.in_flight == state["submitted"] - state["applied"]
    restored = SimulatedExchange("uniform:0:4", seed=123)  # another seed: the saved generator state wins
    restored.load_state_dict(state)
    assert _play(restored, range(10, 40)) == _play(original, range(10, 40))
    assert [r.step for r in restored.drain()] == [r.step for r in original.drain()]
    assert restored.stats.histogram == original.stats.histogram
    assert restored.submitted == restored.applied == 40


def test_state_with_a_lost_gradient_is_refused():
    ex = SimulatedExchange(3)
    _play(ex, range(5))
    state = ex.state_dict()
    state["applied"] -= 1  # claims one more gradient in flight than the queue holds
    with pytest.raises(ValueError, match="inconsistent exchange state: submitted=5, applied=1, but 3 gradients in flight"):
        SimulatedExchange(3).load_state_dict(state)


def test_buckets_place_checks_the_layout_and_moves_to_the_parameters_dtype():
    params = [torch.zeros(3, dtype=torch.float64, requires_grad=True), torch.zeros(5, dtype=torch.float64, requires_grad=True)]
    layout = GradientBuckets(params, bucket_cap_mb=1)
    (placed,) = layout.place([torch.arange(8, dtype=torch.float32)])
    assert placed.dtype == torch.float64 and torch.equal(placed, torch.arange(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="the saved gradient has 2 buckets, this model's layout has 1"):
        layout.place([torch.zeros(3), torch.zeros(5)])
    with pytest.raises(ValueError, match="saved gradient bucket 0 has 7 elements, this model's layout has 8"):
        layout.place([torch.zeros(7)])
