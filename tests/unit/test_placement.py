"""The Placement: what a pipeline rank holds and where each gradient sums,
for every schedule, against the facts stated by hand."""
import dataclasses

import pytest

from mtrain.pipeline.schedule_rules import SCHEDULE_NAMES, copy_groups, placement, stage_rank


@pytest.mark.parametrize("schedule,pp,rank,keys", [
    ("1f1b", 4, 2, ((2, 0),)),
    ("zb1p", 4, 0, ((0, 0),)),
    ("dualpipe", 4, 1, ((1, 0), (2, 1))),
    ("dualpipev", 4, 1, ((1, 0), (6, 0))),
])
def test_chunk_keys(schedule, pp, rank, keys):
    assert placement(schedule, pp, rank, mtp=False).chunk_keys == keys


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_every_stage_is_held_by_the_rank_that_runs_it(schedule):
    pp = 4
    for rank in range(pp):
        for stage, direction in placement(schedule, pp, rank, mtp=False).chunk_keys:
            assert stage_rank(schedule, pp, stage, direction) == rank


def test_embedding_copy_only_where_the_last_stage_has_no_first_stage_beside_it():
    # A fact of the pipeline, the same on every rank: both ends sum the embedding's gradient.
    at_pp2 = {s: [placement(s, 2, r, mtp=True).embedding_copy for r in range(2)] for s in SCHEDULE_NAMES}
    assert at_pp2 == {"1f1b": [True, True], "zb1p": [True, True], "dualpipe": [False, False],
                      "dualpipev": [False, False]}
    assert placement("zb1p", 4, 0, mtp=True).replica_groups("embed.weight", expert=False) == ["dp", "embedding"]
    assert placement("1f1b", 2, 1, mtp=True).embedding_copy
    assert not placement("1f1b", 2, 1, mtp=False).embedding_copy
    assert not placement("1f1b", 1, 0, mtp=True).embedding_copy
    assert not placement("dualpipe", 4, 3, mtp=True).embedding_copy
    assert not placement("dualpipev", 4, 0, mtp=True).embedding_copy


def test_replica_groups_and_who_speaks_for_a_gradient():
    one = placement("1f1b", 2, 1, mtp=True)
    assert one.replica_groups("embed.weight", expert=False) == ["dp", "embedding"]
    assert one.replica_groups("layers.3.mlp.experts.up", expert=True) == ["expert_dp"]
    assert not one.speaks_for((1, 0), "embed.weight") and one.speaks_for((1, 0), "head.weight")
    dual = placement("dualpipe", 4, 0, mtp=True)
    assert dual.replica_groups("embed.weight", expert=False) == ["dp", "stage_copy"]
    assert dual.speaks_for((0, 0), "embed.weight") and not dual.speaks_for((3, 1), "head.weight")
    assert dual.holds_first_stage and dual.holds_last_stage and dual.copies_per_stage == 2


def test_placement_is_frozen_and_copy_groups_pair_mirrored_ranks():
    with pytest.raises(dataclasses.FrozenInstanceError):
        placement("1f1b", 2, 0, mtp=False).pp = 3
    assert copy_groups("dualpipe", 4) == [[0, 3], [1, 2]]
    assert copy_groups("dualpipev", 4) == copy_groups("1f1b", 4) == []
