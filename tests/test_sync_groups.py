"""Sync groups at the exchange level (exchange/grouped.py): synchronous inside a group, p2p between groups, on 4 real
Gloo processes; ``sync_group_size = N`` is ddp, ``1`` is the plain p2p transport."""

from __future__ import annotations

import json

import pytest

from lightning_asyncpred.exchange.grouped import group_layout
from tests.dist_helpers import SCRIPT, run

GROUPED = SCRIPT.parent / "grouped_exchange.py"


def test_group_layout_groups_and_columns():
    assert group_layout(8, 4) == ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]])
    assert group_layout(4, 1) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])
    assert group_layout(4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    with pytest.raises(ValueError, match="sync_group_size=3 must divide the number of ranks, 8; allowed: 1, 2, 4, 8"):
        group_layout(8, 3)
    with pytest.raises(ValueError, match="sync_group_size"):
        group_layout(8, 0)


@pytest.mark.parametrize("group_size", [2, 4, 1])
def test_grouped_exchange_ends_at_ddps_parameters_and_a_group_installs_the_same(tmp_path, group_size):
    """4 ranks in groups of 2 (two groups of 2, the last slow), 4 (one group: ddp) and 1 (the plain p2p transport):
    6 steps each; every owner makes 6 rounds and the final parameters are ddp's (SGD, momentum, weight decay, the mean
    of the 4 ranks' gradients). After every step the members of a group hold the same parameters."""
    out = tmp_path / f"k{group_size}"
    run(out, "--group-size", str(group_size), "--steps", "6", script=GROUPED, nproc=4, timeout=180)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    for res in ranks:
        assert res["rounds"] == 6
        assert max(abs(a - b) for a, b in zip(res["params"], res["reference"])) < 1e-5
    for g in range(4 // group_size):
        members = [res for res in ranks if res["group"] == g]
        assert len(members) == group_size
        assert all(m["checksums"] == members[0]["checksums"] for m in members)
