"""The p2p owners' semantics (exchange/owner.py, exchange/preview.py): one real optimizer step per round of N
arrivals, previews in between, differential against ddp's step (the user's optimizer on the mean gradient)."""

from __future__ import annotations

import random

import pytest
import torch

from lightning_asyncpred.exchange.owner import ShardOwner
from lightning_asyncpred.exchange.preview import SGDPreview, TentativePreview
from lightning_asyncpred.exchange.sharding import shard_pieces

SHAPES = [(5, 3), (7,), (3, 3), (2,), (4, 2)]


class SignMomentum(torch.optim.Optimizer):
    """A user's own optimizer: signed momentum with decoupled decay (not affine in the gradient)."""

    def __init__(self, params, lr=0.01, beta=0.9, decay=0.0):
        super().__init__(params, dict(lr=lr, beta=beta, decay=decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                m.mul_(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
                p.mul_(1 - group["lr"] * group["decay"]).add_(m.sign() + 0.1 * m, alpha=-group["lr"])


OPTIMIZERS = {
    "sgd_momentum_wd": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgd_nesterov_wd": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-2),
    "sgd_dampening_maximize": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=1e-2,
                                                        maximize=True),
    "sgd_plain": lambda g: torch.optim.SGD(g, lr=0.1),
    "adam_l2": lambda g: torch.optim.Adam(g, lr=0.01, weight_decay=1e-2),
    "adamw_amsgrad": lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1, amsgrad=True),
    "custom": lambda g: SignMomentum(g, lr=0.01, decay=0.1),
}


def _groups(params):
    # two groups with different hyperparameters (weight decay off on the second, as for norms and biases)
    return [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0, "lr": 0.02}]


def _groups_for(make, params):
    groups = _groups(params)
    if make is OPTIMIZERS["custom"]:
        groups[1] = {"params": params[3:], "decay": 0.0, "lr": 0.02}
    return groups


def _targets(n_workers):
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(n_workers)]


def _gradient(params, target):
    """A nonlinear gradient of the parameters (so the point a gradient is computed at matters)."""
    return [(w - t) * (1 + w.abs()) for w, t in zip(params, target)]


def _owners(make, init, n, sharding="whole"):
    params = [p.clone().requires_grad_() for p in init]
    user = make(_groups_for(make, params))
    shards = shard_pieces([p.numel() for p in params], n, sharding)
    return [ShardOwner(user, params, shard, world_size=n) for shard in shards], user


def _masters(owners, count):
    """The whole parameters from the owners' pieces."""
    params = owners[0].params
    out = [torch.empty(params[i].numel()) for i in range(count)]
    for o in owners:
        for piece, m in zip(o.pieces, o.masters):
            out[piece.index][piece.start : piece.stop] = m.detach().reshape(-1)
    return [t.view(params[i].shape) for i, t in enumerate(out)]


def _shard(o, grads):
    return torch.cat([grads[p.index].reshape(-1)[p.start : p.stop] for p in o.pieces])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("n,sharding", [(2, "whole"), (4, "whole"), (3, "flat"), (4, "flat")])
def test_lockstep_rounds_are_ddp_steps(name, n, sharding):
    """Each round is the N workers' gradients at the round's base, arriving in a random order (each owner its own
    order): after every round the owners' masters equal ddp's parameters (the user's optimizer stepped with the
    mean), and the published master is the base (no preview left). With flat shards tensors are cut between
    owners (every optimizer here is element-wise, the user's own too)."""
    make = OPTIMIZERS[name]
    init = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
    ref = [p.clone().requires_grad_() for p in init]
    ref_opt = make(_groups_for(make, ref))
    owners, _ = _owners(make, init, n, sharding)
    if sharding == "flat":
        assert any(p.numel < owners[0].params[p.index].numel() for o in owners for p in o.pieces)
    targets = _targets(n)
    rng = random.Random(0)
    for r in range(6):
        grads = [_gradient([p.detach() for p in ref], t) for t in targets]
        for i, p in enumerate(ref):
            p.grad = sum(g[i] for g in grads) / n
        ref_opt.step()
        base = _masters(owners, len(SHAPES))
        worker_grads = [_gradient(base, t) for t in targets]
        for o in owners:
            order = list(range(n))
            rng.shuffle(order)
            for position, w in enumerate(order):  # every worker read version r * n
                o.apply(_shard(o, worker_grads[w]), source=w, staleness=position)
        for o in owners:
            assert o.rounds == r + 1 and o.count == 0
            assert torch.equal(o.flat, o.base)
        for i, m in enumerate(_masters(owners, len(SHAPES))):
            expected = ref[i].detach()
            assert torch.allclose(m, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item()), (name, r, i)


def test_lockstep_stays_ddp_with_the_staleness_aware_lr():
    """The staleness-aware lr counts staleness in rounds: every arrival of a lockstep round is 0 rounds stale."""
    n = 4
    make = OPTIMIZERS["sgd_momentum_wd"]
    init = [torch.randn(s) for s in SHAPES]
    plain, _ = _owners(make, init, n)
    remedied, _ = _owners(make, init, n)
    for o in remedied:
        o.set_remedies(staleness_lr=True)
    targets = _targets(n)
    for _ in range(3):
        for group in (plain, remedied):
            base = _masters(group, len(SHAPES))
            for o in group:
                for position, t in enumerate(targets):
                    assert o.round_staleness(position) == 0
                    o.apply(_shard(o, _gradient(base, t)), staleness=position)
    for a, b in zip(_masters(plain, len(SHAPES)), _masters(remedied, len(SHAPES))):
        assert torch.equal(a, b)


def test_round_staleness_counts_the_real_steps_since_the_version_read():
    w = [torch.zeros(3, requires_grad=True)]
    owner = ShardOwner(torch.optim.SGD(w, lr=0.1), w, [0], world_size=3)
    for _ in range(7):  # rounds 0, 1 complete; 1 arrival into round 2 (version 7)
        owner.apply(torch.ones(3))
    assert (owner.rounds, owner.count, owner.arrivals) == (2, 1, 7)
    assert [owner.round_staleness(s) for s in range(8)] == [0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("kwargs", [
    dict(momentum=0.0, weight_decay=0.1),
    dict(momentum=0.9, weight_decay=0.1),
    dict(momentum=0.9, nesterov=True, weight_decay=0.1),
    dict(momentum=0.7, dampening=0.4, weight_decay=0.05, maximize=True),
])
@pytest.mark.parametrize("same_lr", [True, False])
def test_sgd_closed_form_preview_is_the_tentative_step(kwargs, same_lr):
    """SGDPreview (one pass per arrival, no buffer) publishes what the general rule (a tentative step of a scratch copy)
    publishes, in the first round (no momentum buffer yet) and in later ones, with one lr or one per group."""
    n = 5
    torch.manual_seed(0)
    init = [torch.randn(s) for s in SHAPES]
    pair = []
    for preview in (SGDPreview, TentativePreview):
        params = [p.clone().requires_grad_() for p in init]
        groups = _groups(params)
        if same_lr:
            del groups[1]["lr"]
        owner = ShardOwner(torch.optim.SGD(groups, **kwargs, lr=0.1), params, list(range(len(params))),
                           world_size=n)
        owner._preview = preview(owner.optimizer, owner.masters, owner.base, n)
        pair.append(owner)
    assert isinstance(_owners(OPTIMIZERS["sgd_plain"], init, 2)[0][0]._preview, SGDPreview)
    assert isinstance(_owners(OPTIMIZERS["adam_l2"], init, 2)[0][0]._preview, TentativePreview)
    for _ in range(3 * n):
        g = torch.randn(pair[0].flat.numel())
        a, b = (o.apply(g.clone()).clone() for o in pair)
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert pair[0].buffer_bytes() == 3 * pair[0].base.numel() * 4  # base, published, sum: no preview buffer


def test_a_preview_is_k_over_n_of_the_round_step():
    """Plain SGD: after k arrivals the published master is ``w_r - lr G_k / N``: each arrival its 1/N share."""
    n, lr = 4, 0.5
    w = [torch.tensor([1.0, -2.0, 3.0], requires_grad=True)]
    owner = ShardOwner(torch.optim.SGD(w, lr=lr), w, [0], world_size=n)
    base = owner.flat.clone()
    total = torch.zeros(3)
    for _ in range(1, n):
        g = torch.randn(3)
        total += g
        assert torch.allclose(owner.apply(g), base - lr * total / n)
        assert torch.equal(owner.base, base)  # the base moves only at the real step


def test_weight_decay_momentum_decay_and_adam_steps_happen_once_per_round():
    """The issue's measurement: with zero gradients SGD's weight decay shrinks the masters once per round of N
    arrivals, not once per arrival; Adam with a constant gradient moves lr per round (and no preview moves further
    than one real step); AdamW's decoupled decay too."""
    n, rounds = 4, 5
    w = [torch.ones(6, requires_grad=True)]
    sgd = ShardOwner(torch.optim.SGD(w, lr=0.1, weight_decay=0.5, momentum=0.9), w, [0], world_size=n)
    ref = [torch.ones(6, requires_grad=True)]
    ref_opt = torch.optim.SGD(ref, lr=0.1, weight_decay=0.5, momentum=0.9)
    for _ in range(rounds):
        for _ in range(n):
            sgd.apply(torch.zeros(6))
        ref[0].grad = torch.zeros(6)
        ref_opt.step()
    assert torch.allclose(sgd.flat, ref[0].detach())
    assert sgd.flat[0].item() > 0.1  # N per round would have decayed it much further (and oscillated)

    lr = 0.01
    for cls, kwargs in ((torch.optim.Adam, {}), (torch.optim.AdamW, {"weight_decay": 0.0})):
        w = [torch.zeros(6, requires_grad=True)]
        adam = ShardOwner(cls(w, lr=lr, **kwargs), w, [0], world_size=n)
        for r in range(rounds):
            for _ in range(n):
                published = adam.apply(torch.full((6,), 3.0))
                assert published.abs().max().item() <= lr * (r + 1) + 1e-7
        assert torch.allclose(adam.flat, torch.full((6,), -lr * rounds), atol=1e-6)

    w = [torch.ones(6, requires_grad=True)]
    adamw = ShardOwner(torch.optim.AdamW(w, lr=0.1, weight_decay=0.5), w, [0], world_size=n)
    for _ in range(n * rounds):
        adamw.apply(torch.zeros(6))
    assert torch.allclose(adamw.flat, torch.full((6,), (1 - 0.1 * 0.5) ** rounds))


@pytest.mark.parametrize("name", ["sgd_nesterov_wd", "adamw_amsgrad", "custom"])
def test_a_round_in_progress_survives_save_and_load(name):
    """Asynchronous arrivals (random staleness), saved mid-round as a checkpoint holds it (the published master as
    the model, the optimizer state, the round state), loaded into new owners: both continue identically."""
    n = 3
    make = OPTIMIZERS[name]
    torch.manual_seed(0)
    init = [torch.randn(s) for s in SHAPES]
    owners, user = _owners(make, init, n)
    rng = random.Random(1)
    for _ in range(2 * n + 2):
        for o in owners:
            o.apply(torch.randn(o.flat.numel()), staleness=rng.randrange(0, 4))
    assert owners[0].count == 2
    model = _published(owners)
    optimizer_state = {i: s for o in owners for i, s in o.state_dict().items()}
    round_state = {"params": {}}
    for o in owners:
        st = o.round_state()
        round_state.update({k: v for k, v in st.items() if k != "params"})
        round_state["params"].update(st["params"])

    resumed, _ = _owners(make, model, n)  # built from the saved model (the published masters)
    for o in resumed:
        o.load_round_state(round_state)
        o.load_state(optimizer_state)
    for a, b in zip(owners, resumed):
        assert torch.equal(a.flat, b.flat) and torch.equal(a.base, b.base)
        assert (a.rounds, a.count, a.arrivals) == (b.rounds, b.count, b.arrivals)
    for _ in range(2 * n + 1):
        for a, b in zip(owners, resumed):
            g = torch.randn(a.flat.numel())
            assert torch.equal(a.apply(g.clone(), staleness=1), b.apply(g.clone(), staleness=1))


def test_a_round_saved_by_more_workers_completes_with_the_mean_of_its_arrivals():
    w = [torch.zeros(2, requires_grad=True)]
    four = ShardOwner(torch.optim.SGD(w, lr=1.0), w, [0], world_size=4)
    for g in (1.0, 2.0, 3.0):
        four.apply(torch.full((2,), g))
    state = four.round_state()
    v = [four.flat.clone().requires_grad_()]
    two = ShardOwner(torch.optim.SGD(v, lr=1.0), v, [0], world_size=2)
    two.load_round_state(state)
    two.apply(torch.full((2,), 6.0))  # 4 arrivals >= 2: the round completes with their mean, 3
    assert two.rounds == 1 and two.count == 0
    assert torch.allclose(two.flat, torch.full((2,), -3.0))


def test_on_round_runs_after_each_real_step():
    w = [torch.zeros(2, requires_grad=True)]
    owner = ShardOwner(torch.optim.SGD(w, lr=1.0), w, [0], world_size=3)
    seen = []
    owner.on_round = lambda rounds: seen.append((rounds, owner.count, owner.flat.clone()))
    for _ in range(7):
        owner.apply(torch.ones(2))
    assert [s[0] for s in seen] == [1, 2] and all(s[1] == 0 for s in seen)
    assert torch.equal(seen[1][2], torch.full((2,), -2.0))


def test_bad_world_size_is_a_clear_error():
    w = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"world_size must be an int >= 1 \(the arrivals per round\), got 0"):
        ShardOwner(torch.optim.SGD(w, lr=1.0), w, [0], world_size=0)


def _published(owners):
    out = [None] * sum(len(o.owned) for o in owners)
    for o in owners:
        offset = 0
        for i in o.owned:
            n = o.params[i].numel()
            out[i] = o.flat[offset : offset + n].view_as(o.params[i]).clone()
            offset += n
    return out
