"""The planner (lightning_asyncpred/planner): the model's values against what the transports' rules imply, the
advice, bad input and the ``asyncpred plan`` command."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from lightning_asyncpred.exchange import p2p_protocol
from lightning_asyncpred.planner import Config, Link, Perturbation, Profile, link_from_allreduce, simulate
from lightning_asyncpred.planner.advise import advise, candidates
from lightning_asyncpred.planner import model
from lightning_asyncpred.planner.model import Replay, run


def steady(step: float = 0.05, ranks: int = 2, **kw) -> Profile:
    return Profile(compute=[[step] * 10 for _ in range(ranks)], batch_size=32, **kw)


@pytest.mark.parametrize("n", [2, 4, 8, 32])
def test_p2p_staleness_at_equal_speeds_is_the_pipeline_depth_in_rounds(n):
    """Equal steps, a round trip shorter than a step: each worker's gradient meets the arrivals of every other
    worker since its read: ``d N - 1`` owner updates with ``d = s + 1`` steps in the pipeline (exchange/virtual.py's
    timing model; with a round trip of 0 the answer would be there before the next step, and ``d = 1``)."""
    for s in (0, 1):
        p = simulate(steady(link=Link(latency=1e-6)), Config("p2p", s), n)
        assert p.staleness_mean == pytest.approx((s + 1) * n - 1, rel=0.01)
        assert p.staleness_rounds == pytest.approx(((s + 1) * n - 1) / n, rel=0.01)
        assert p.efficiency == pytest.approx(1.0, abs=0.01)


def test_the_p2p_bound_is_the_transports_own_rule(monkeypatch):
    """The model calls p2p_protocol.within_bound: a bound that never holds back would make s=0 as stale as s=1."""
    prof = steady(link=Link(latency=1e-3))
    assert simulate(prof, Config("p2p", 0), 4).staleness_mean == pytest.approx(3, abs=0.05)
    monkeypatch.setattr(model, "within_bound", lambda in_flight, s: True)
    assert simulate(prof, Config("p2p", 0), 4).staleness_mean > 6
    assert p2p_protocol.within_bound(1, 0) is False and p2p_protocol.within_bound(1, 1) is True


def test_allreduce_staleness_is_exactly_s_in_fixed_mode_and_at_most_s_eager():
    prof = Profile(compute=[[0.04, 0.05, 0.06, 0.08]] * 4, batch_size=8)
    for s in (1, 2, 4):
        fixed = simulate(prof, Config("allreduce", s), 4)
        assert fixed.staleness.max == s and fixed.staleness_mean == pytest.approx(s, abs=0.02)
        eager = simulate(prof, Config("allreduce", s, "eager"), 4)
        assert eager.staleness.max <= s and eager.staleness_mean < s


def test_a_straggler_slows_ddp_and_allreduce_but_p2p_reaches_the_sum_of_rates():
    """Rank N-1 twice as slow, constant steps, free link: ddp and stale-synchronous all-reduce run at the
    straggler's pace (N B / 2 t), p2p drawing from the pool at the sum of the ranks' rates ((N - 1/2) B / t)."""
    prof, n, t = steady(0.05), 4, 0.05
    slow = Perturbation("straggler:2")
    ddp = simulate(prof, Config("ddp"), n, slow)
    assert ddp.samples_per_s == pytest.approx(n * 32 / (2 * t), rel=1e-6)
    assert simulate(prof, Config("allreduce", 2), n, slow).samples_per_s == pytest.approx(ddp.samples_per_s, rel=0.02)
    p2p = simulate(prof, Config("p2p", 1), n, slow)
    assert p2p.limit == pytest.approx((n - 0.5) * 32 / t, rel=1e-6)
    assert p2p.efficiency == pytest.approx(1.0, abs=0.02)
    # static shards: every rank takes the same steps, so the run ends with the straggler
    static = simulate(prof, Config("p2p", 1, pool=False), n, slow)
    assert static.samples_per_s == pytest.approx(ddp.samples_per_s, rel=0.02)


def test_replayed_run_matches_the_closed_forms_of_the_ideal_schedules():
    """On a measured step-time matrix with a free link: ddp takes sum_t max_r w, p2p without a bound max_r sum_t w,
    and bounded staleness s the recurrence F[r][t] = max(C[r][t], max_q C[q][t - s])."""
    rng = random.Random(3)
    work = [[rng.uniform(0.01, 0.09) for _ in range(30)] for _ in range(3)]
    assert run(Replay(work), 3, 30, Config("ddp"))[0] == pytest.approx(sum(max(c) for c in zip(*work)))
    assert run(Replay(work), 3, 30, Config("p2p", 30, pool=False))[0] == pytest.approx(max(sum(r) for r in work))
    for s in (1, 3):
        done, finish = [[0.0] * 30 for _ in range(3)], [0.0] * 3
        for t in range(30):
            for r in range(3):
                done[r][t] = finish[r] + work[r][t]
            gate = max(done[q][t - s] for q in range(3)) if t >= s else 0.0
            finish = [max(done[r][t], gate) for r in range(3)]
        assert run(Replay(work), 3, 30, Config("allreduce", s))[0] == pytest.approx(max(finish))


def test_link_cost_enters_ddp_as_a_ring_allreduce_and_p2p_as_a_round_trip():
    link = Link(latency=1e-4, bandwidth=1e9)
    prof = steady(0.05, gradient_bytes=10e6, link=link)
    ddp = simulate(prof, Config("ddp"), 8)
    ring = 2 * 7 * (1e-4 + 10e6 / 8 / 1e9)
    assert ddp.samples_per_s == pytest.approx(8 * 32 / (0.05 + ring), rel=1e-6)
    # p2p s=0 waits for its round trip (7/8 of the gradient out, 7/8 in) every step, s=1 hides it behind the next
    assert simulate(prof, Config("p2p", 0), 8).efficiency < 0.9 < 0.97 < simulate(prof, Config("p2p", 1), 8).efficiency
    # a gradient the link needs longer for than a step: p2p is link-bound too (each rank's link carries 2 (N - 1) / N
    # gradients per step, as a ring all-reduce does)
    heavy = steady(0.05, gradient_bytes=100e6, link=link)
    assert simulate(heavy, Config("p2p", 2), 8).efficiency < 0.6
    fitted = link_from_allreduce(2 * 7 * 1e-4, 2 * 7 * 1e-4 + 2 * 7 / 8 * 100e6 / 1e9, 100e6, 8)
    assert fitted.latency == pytest.approx(1e-4) and fitted.bandwidth == pytest.approx(1e9)


def test_one_sync_group_of_all_ranks_is_ddp_and_groups_cut_the_staleness():
    prof = steady(0.05, ranks=1)
    one = simulate(prof, Config("p2p", 0, group_size=8), 8)
    assert one.staleness.max == 0
    assert one.samples_per_s == pytest.approx(simulate(prof, Config("ddp"), 8).samples_per_s, rel=1e-6)
    assert simulate(prof, Config("p2p", 0, group_size=2), 8).staleness_mean == pytest.approx(3, abs=0.05)  # G - 1


def test_256_ranks_every_candidate():
    prof = Profile(compute=[[0.05, 0.06, 0.055]] * 2, batch_size=32, gradient_bytes=100e6, link=Link(2e-5, 1e10),
                   owner_ns_per_element=1.0)
    preds = [simulate(prof, c, 256, Perturbation("jitter:0.2")) for c in candidates(256)]
    assert {p.config.name for p in preds} >= {"ddp", "p2p s=1", "p2p s=0 groups of 8", "allreduce s=4 eager"}
    assert all(0 < p.efficiency <= 1.001 for p in preds)


def test_advice_takes_the_fastest_within_the_staleness_bound_or_ddp():
    prof = steady(0.05, gradient_bytes=100e6, link=Link(1e-4, 1e9))
    preds = [simulate(prof, c, 4, Perturbation("straggler:2")) for c in candidates(4)]
    advice = advise(preds)
    assert advice.choice.config.transport == "p2p" and advice.choice.staleness_rounds <= 2
    assert "x ddp's samples/s" in advice.reason and advice.strategy_args.startswith("AsyncPredStrategy(")
    # equal speeds and a free link: nothing beats ddp by 5%
    calm = [simulate(steady(), c, 4) for c in candidates(4)]
    assert advise(calm).choice.config.transport == "ddp" and "only" in advise(calm).reason
    # a staleness bound nothing meets
    assert advise(preds, max_rounds=0.1).choice.config.transport == "ddp"


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="compute"):
        Profile(compute=[], batch_size=8)
    with pytest.raises(ValueError, match=r"compute\[1\] has -0.1"):
        Profile(compute=[[0.1], [-0.1]], batch_size=8)
    with pytest.raises(ValueError, match="batch_size=0"):
        Profile(compute=[[0.1]], batch_size=0)
    with pytest.raises(ValueError, match="transport 'nccl'"):
        Config("nccl")
    with pytest.raises(ValueError, match="group_size=2: sync groups are p2p with max_staleness=0"):
        Config("p2p", 1, group_size=2)
    with pytest.raises(ValueError, match="unknown speed model 'slow'"):
        Perturbation("slow")
    with pytest.raises(ValueError, match="not a planner profile"):
        Profile.from_dict({"compute": [[0.1]], "batch_size": 8})


def test_asyncpred_plan_prints_a_table_per_rank_count_and_a_recommendation(tmp_path):
    prof = Profile(compute=[[0.05, 0.052], [0.05, 0.049]], batch_size=32, gradient_bytes=20e6,
                   link=Link(5e-5, 5e9), samples_per_epoch=100_000)
    path = tmp_path / "run.json"
    prof.save(path)
    assert Profile.load(path).to_dict() == prof.to_dict()
    out = subprocess.run([sys.executable, "-m", "lightning_asyncpred", "plan", "--profile", str(path), "--ranks", "4,16",
                          "--speeds", "straggler:2", "--out", str(tmp_path / "plan")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("recommended: ") == 2 and "\n16 ranks\n" in out.stdout
    record = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert [r["ranks"] for r in record] == [4, 16]
    assert (tmp_path / "plan" / "plan.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, "-m", "lightning_asyncpred", "plan", "--profile", str(tmp_path / "no.json")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "does not exist" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "lightning_asyncpred", "plan", "--profile", str(path), "--ranks", "1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "every number of ranks must be >= 2" in bad.stderr


def _profile_of(config, m=0.0, reduction=None, shared_cpu=False, ranks=2, seed=5, share=None):
    """A profile whose waits are the model's own at message cost ``m`` / reduction time ``reduction`` / thread share
    ``share``: the calibration must give those back."""
    rng = random.Random(seed)
    compute = [[rng.uniform(0.008, 0.012) for _ in range(200)] for _ in range(ranks)]
    prof = Profile(compute=compute, batch_size=16, transport=config.transport, max_staleness=config.max_staleness,
                   message_seconds=m, reduction_seconds=reduction, shared_cpu=shared_cpu, link=Link(1e-4, 1e9),
                   gradient_bytes=1e6, thread_share=share)
    pred = simulate(prof, config, ranks)
    prof.wait = [[pred.wait_per_step] * 200 for _ in range(ranks)]
    prof.message_seconds = prof.reduction_seconds = prof.thread_share = None
    return prof, pred


@pytest.mark.parametrize("shared_cpu", [False, True])
def test_the_p2p_message_cost_is_recovered_from_a_profiles_waits(shared_cpu):
    """max_staleness=0: from the waits (its worker waits for every round trip); a higher bound or another
    transport: nothing to fit."""
    prof, _ = _profile_of(Config("p2p", 0), m=2e-3, shared_cpu=shared_cpu)
    assert model.calibrate_messages(prof) == pytest.approx(2e-3, rel=0.05)
    deep, _ = _profile_of(Config("p2p", 2), m=2e-3, shared_cpu=shared_cpu)
    assert model.calibrate_messages(deep) is None
    assert model.calibrate_messages(steady()) is None


def test_the_threads_share_of_a_core_is_recovered_from_a_deeper_profile():
    """On a CPU host the thread's work beside the compute shows where the worker does not wait for it: a p2p profile
    with a higher bound (its rate and staleness as the model gives them at share 0.2, m = 1 ms) beside one of
    max_staleness=0 (its waits): calibrate_all gives back the share and m, for both profiles."""
    source, _ = _profile_of(Config("p2p", 0), m=1e-3, shared_cpu=True, ranks=3, share=0.2)
    deep, pred = _profile_of(Config("p2p", 2), m=1e-3, shared_cpu=True, ranks=3, share=0.2)
    deep.staleness_histogram = list(pred.staleness.histogram)
    step = 3 * 16 / pred.samples_per_s  # the measured rate is the model's: the steps' wall time
    deep.wait = [[step - sum(row) / len(row)] * len(row) for row in deep.compute]
    assert model.calibrate_thread_share(source, deep)[0] == 0.2
    model.calibrate_all([source, deep])
    assert source.thread_share == deep.thread_share == 0.2
    assert source.message_seconds == deep.message_seconds == pytest.approx(1e-3, rel=0.05)
    # not a CPU host: the thread has a core of its own, nothing to fit
    source.shared_cpu = False
    assert model.calibrate_thread_share(source, deep) is None


def test_the_reduction_time_is_recovered_from_an_allreduce_profiles_rate():
    prof, _ = _profile_of(Config("allreduce", 1), reduction=0.03)
    assert model.calibrate_reduction(prof) == pytest.approx(0.03, rel=0.1)


def test_each_configuration_takes_its_own_transports_profile():
    ddp = Profile(compute=[[0.05]], batch_size=8, transport="ddp")
    p0 = Profile(compute=[[0.05], [0.05]], batch_size=8, transport="p2p", max_staleness=0)
    p2 = Profile(compute=[[0.05]], batch_size=8, transport="p2p", max_staleness=2)
    profiles = [ddp, p0, p2]
    # p2p: a profile of the same regime first (workers computing while gradients are in flight, s >= 1, or waiting
    # for each answer, s = 0), then the nearest bound: s = 1 is as near to 0 as to 2, but it computes beside its
    # messages as s = 2 does
    assert model.overlaps("p2p", 1) and model.overlaps("p2p", 2) and not model.overlaps("p2p", 0)
    assert not model.overlaps("allreduce", 2)
    assert model.pick_profile(profiles, Config("p2p", 1)) is p2
    assert model.pick_profile([ddp, p2, p0], Config("p2p", 1)) is p2
    assert model.pick_profile(profiles, Config("p2p", 4)) is p2
    assert model.pick_profile(profiles, Config("p2p", 0)) is p0
    assert model.pick_profile([ddp, p2], Config("p2p", 0)) is p2  # the only p2p profile
    assert model.pick_profile(profiles, Config("p2p", 2)) is p2
    assert model.pick_profile(profiles, Config("ddp")) is ddp
    assert model.pick_profile(profiles, Config("allreduce", 2)) is ddp  # none of its own: the first
    p0.wait = [[0.01], [0.01]]
    model.calibrate_all(profiles)
    assert p2.message_seconds == p0.message_seconds is not None and ddp.message_seconds is None


def test_a_profile_without_its_own_fit_takes_the_message_cost_of_its_exchange_layout():
    """A group's members exchange with their column only: a p2p profile of single ranks takes the cost fitted to
    the single-rank s=0 profile, not to the groups' one, whichever is listed first."""
    groups, _ = _profile_of(Config("p2p", 0, group_size=2), m=4e-3, ranks=4)
    groups.sync_group_size = 2
    single, _ = _profile_of(Config("p2p", 0), m=1e-3, ranks=4)
    deep = Profile(compute=[[0.01]] * 4, batch_size=16, transport="p2p", max_staleness=2)
    model.calibrate_all([groups, single, deep])
    assert deep.message_seconds == single.message_seconds == pytest.approx(1e-3, rel=0.05)
    assert groups.message_seconds == pytest.approx(4e-3, rel=0.05)


def test_share_core_is_work_conserving():
    """A thread's work beside a compute on one core: alone at full speed, beside the compute at the share, and the
    compute ends later by exactly the work done beside it."""
    import numpy as np

    cs, ce, on = np.array([1.0] * 4), np.array([3.0] * 4), np.array([True, True, True, False])
    begin = np.array([1.5, 0.5, 2.5, 1.5])
    end, compute_end = model.share_core(begin, 0.4, cs, ce, on, share=0.5)
    # beside the compute: 0.4 at half speed (0.8 s), the compute 0.4 later; done alone before the compute starts;
    # beside the compute's last 0.5 (which would take 1.0 s at half speed): the work ends first at 2.5 + 0.8;
    # no compute: alone
    assert end.tolist() == pytest.approx([2.3, 0.9, 3.3, 1.9])
    assert compute_end.tolist() == pytest.approx([3.4, 3.0, 3.4, 3.0])
    # the compute runs out first: 0.2 of compute left at half speed (0.4 s), 0.2 of work done beside it, 1.0 alone
    end, compute_end = model.share_core(np.array([2.8]), 1.2, np.array([1.0]), np.array([3.0]), np.array([True]))
    assert end[0] == pytest.approx(2.8 + 0.4 + 1.0) and compute_end[0] == pytest.approx(3.2)
    with pytest.raises(ValueError, match=r"share=1"):
        model.share_core(begin, 0.4, cs, ce, on, share=1)


def test_a_steps_staleness_is_the_largest_over_its_owners(monkeypatch):
    """As P2PExchange reports it: each owner counts its own updates (the worker's own shard is applied at its
    submission, the others at arrival) with the protocol's arrival_staleness; a step's staleness is the largest."""
    calls = []

    def recorded(owner_version, read_version):
        out = p2p_protocol.arrival_staleness(owner_version, read_version)
        calls.append(out)
        return out

    monkeypatch.setattr(model, "arrival_staleness", recorded)
    prof = steady(link=Link(latency=2e-3))
    pred = simulate(prof, Config("p2p", 1), 3, Perturbation("jitter:0.5"), steps=60)
    assert len(calls) == pred.staleness.count == 180 and all(len(c) == 3 for c in calls)  # every owner, every step
    steps = [int(c.max()) for c in calls]
    assert sorted(steps) == sorted(t for t, n in enumerate(pred.staleness.histogram) for _ in range(n))
    # owners disagree under jitter: the largest is above their mean
    assert sum(steps) > sum(float(c.mean()) for c in calls)


def test_straggler_delay_slows_the_last_rank_only():
    """benchmarks/straggler.py's straggler sleeps b + c more than the others: ddp runs at its pace, the limit counts
    it once."""
    prof, n = steady(0.05), 4
    slow = Perturbation(straggler_delay=0.03)
    assert simulate(prof, Config("ddp"), n, slow).samples_per_s == pytest.approx(n * 32 / 0.08, rel=1e-6)
    assert simulate(prof, Config("p2p", 1), n, slow).limit == pytest.approx(32 * (3 / 0.05 + 1 / 0.08), rel=1e-6)
    with pytest.raises(ValueError, match="straggler_delay=-1"):
        Perturbation(straggler_delay=-1)


def test_a_groups_profile_drives_group_steps_as_measured():
    """A profile of sync groups measured its members waiting for each other (the all-reduce is in their steps):
    a group's step is one measured step of one measured group, not the maximum of two independent draws."""
    steps = [0.01, 0.03] * 50  # the two members' steps, synchronized by their all-reduce
    prof = Profile(compute=[steps, steps], batch_size=8, transport="p2p", sync_group_size=2, link=Link(1e-6))
    grouped = simulate(prof, Config("p2p", 0, group_size=2), 2, steps=2000)
    assert grouped.samples_per_s == pytest.approx(2 * 8 / 0.02, rel=0.03)
    prof.sync_group_size = 1  # the same steps as independent ranks': E[max of two draws] = 0.025
    assert simulate(prof, Config("p2p", 0, group_size=2), 2, steps=2000).samples_per_s == pytest.approx(
        2 * 8 / 0.025, rel=0.03)


def test_on_a_cpu_host_a_background_reduction_costs_only_what_the_idle_part_does_not_absorb():
    busy = Profile(compute=[[0.01] * 10] * 2, batch_size=8, shared_cpu=True, reduction_seconds=0.004)
    sleepy = Profile(compute=[[0.01] * 10] * 2, data=[[0.005] * 10] * 2, batch_size=8, shared_cpu=True,
                     reduction_seconds=0.004)
    assert simulate(busy, Config("allreduce", 2), 2).samples_per_s == pytest.approx(2 * 8 / 0.014, rel=0.01)
    assert simulate(sleepy, Config("allreduce", 2), 2).samples_per_s == pytest.approx(2 * 8 / 0.015, rel=0.01)


def test_a_ddp_profile_predicts_its_own_rate():
    """ddp's measured steps already waited for the slowest rank: the model takes a measured step of every rank at
    once, so a ddp profile reproduces its own throughput instead of the maximum of independent draws."""
    rng = random.Random(1)
    steps = [rng.uniform(0.01, 0.03) for _ in range(300)]
    prof = Profile(compute=[steps, [x - 0.001 for x in steps]], batch_size=8, transport="ddp")
    measured = 2 * 8 / (sum(steps) / len(steps))
    assert simulate(prof, Config("ddp"), 2, steps=3000).samples_per_s == pytest.approx(measured, rel=0.03)
