"""BoundedStalenessQueue invariants, staleness specs and statistics."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_asyncpred.staleness import BoundedStalenessQueue, StalenessStats, parse_staleness

ops = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(0, 10)),
        st.tuples(st.just("ready"), st.just(0)),
        st.tuples(st.just("drain"), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(max_staleness=st.integers(0, 6), sequence=ops)
def test_queue_invariants(max_staleness, sequence):
    q = BoundedStalenessQueue(max_staleness)
    out = []
    for op, delay in sequence:
        if op == "submit":
            q.submit(q.submitted, delay)
        else:
            released = q.ready() if op == "ready" else q.drain()
            for r in released:
                assert r.item == r.index
                assert 0 <= r.staleness <= max_staleness
            out.extend(released)
            if op == "drain":
                assert q.in_flight == 0
        assert q.submitted == q.released + q.in_flight  # counters balance
    out.extend(q.drain())
    assert [r.index for r in out] == list(range(q.submitted))  # exactly once, in submission order
    assert q.released == q.submitted


def test_fixed_delay_released_after_exactly_that_many_submissions():
    q = BoundedStalenessQueue(3)
    released = []
    for step in range(10):
        q.submit(step, delay=3)
        released.append([(r.item, r.staleness) for r in q.ready()])
    assert released[:3] == [[], [], []]
    assert released[3:] == [[(s - 3, 3)] for s in range(3, 10)]


def test_bound_forces_release_of_the_oldest():
    q = BoundedStalenessQueue(2)
    for step in range(4):
        q.submit(step, delay=100)
    assert [(r.item, r.staleness) for r in q.ready()] == [(0, 2), (1, 2)]
    assert q.in_flight == 2


def test_specs():
    assert parse_staleness(4).mean == 4 and parse_staleness("4").bound == 4
    u = parse_staleness("uniform:0:8")
    assert (u.mean, u.bound) == (4.0, 8)
    gen = torch.Generator().manual_seed(0)
    draws = [u.sample(gen) for _ in range(2000)]
    assert min(draws) == 0 and max(draws) == 8 and abs(sum(draws) / len(draws) - 4) < 0.3
    g = parse_staleness("geometric:2", max_staleness=50)
    draws = [g.sample(gen) for _ in range(4000)]
    assert abs(sum(draws) / len(draws) - 2.0) < 0.2 and max(draws) <= 50
    assert parse_staleness("geometric:2", max_staleness=3).bound == 3


@pytest.mark.parametrize(
    "spec, match",
    [
        (-1, "non-negative integer, got -1"),
        (2.5, "non-negative integer, got 2.5"),
        ("abc", "unknown staleness distribution 'abc'"),
        ("poisson:3", "unknown staleness distribution 'poisson'"),
        ("uniform:5:2", "low 5 is above high 2"),
        ("uniform:1", "'uniform' takes two values"),
        ("geometric:-1", "geometric mean must be a number >= 0"),
        (True, "staleness spec must be"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_staleness(spec)


def test_spec_above_bound_and_negative_bound():
    with pytest.raises(ValueError, match="above max_staleness=2"):
        parse_staleness(4, max_staleness=2)
    with pytest.raises(ValueError, match="max_staleness must be a non-negative integer, got -1"):
        BoundedStalenessQueue(-1)


def test_stats():
    s = StalenessStats()
    s.update([0, 2, 2, 4])
    assert (s.count, s.mean, s.max, s.histogram) == (4, 2.0, 4, [1, 0, 2, 0, 1])
    t = StalenessStats()
    t.load_state_dict(s.state_dict())
    assert t.histogram == s.histogram and t.mean == s.mean
    m = s.merge(t)
    assert m.count == 8 and m.histogram == [2, 0, 4, 0, 2]
    with pytest.raises(ValueError, match="staleness must be >= 0, got -3"):
        s.update(-3)


@settings(max_examples=200, deadline=None)
@given(max_staleness=st.integers(0, 6), sequence=ops, cut=st.integers(0, 80))
def test_queue_state_round_trip_continues_identically(max_staleness, sequence, cut):
    """Saving at any point and loading into a fresh queue hands out exactly what the original would have."""

    def play(q, ops):
        out = []
        for op, delay in ops:
            if op == "submit":
                q.submit(q.submitted, delay)
            else:
                out += [(r.index, r.staleness, r.item) for r in (q.ready() if op == "ready" else q.drain())]
        return out

    original = BoundedStalenessQueue(max_staleness)
    play(original, sequence[:cut])
    state = original.state_dict(encode=lambda item: {"wrapped": item})
    assert original.submitted == original.released + original.in_flight  # saving released nothing
    restored = BoundedStalenessQueue(max_staleness)
    restored.load_state_dict(state, decode=lambda saved: saved["wrapped"])
    assert play(restored, sequence[cut:]) == play(original, sequence[cut:])
    assert (restored.submitted, restored.released) == (original.submitted, original.released)


def test_queue_state_that_does_not_balance_is_refused():
    q = BoundedStalenessQueue(4)
    for step in range(3):
        q.submit(step, delay=5)
    state = q.state_dict()
    state["pending"] = state["pending"][1:]  # a gradient lost from the saved state
    with pytest.raises(ValueError, match=r"inconsistent queue state: submitted=3, released=0, in-flight indices \[1, 2\]"):
        BoundedStalenessQueue(4).load_state_dict(state)
