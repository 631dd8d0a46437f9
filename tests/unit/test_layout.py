import itertools

import pytest

from mtrain.parallel.layout import LayoutError, build_layout, ep_hop_groups, layout_errors
from mtrain.pipeline.schedule_rules import copy_groups


def test_published_example_tp2_ep4():
    layout = build_layout(8, tp=2, ep=4, expert_tp=1, pp=1, order="tp-cp-ep-dp-pp")
    g = layout.groups
    assert g["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert g["expert_dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["pp"] == [[r] for r in range(8)]


def test_ep_hop_groups_cut_each_ep_group_into_nodes_and_rails():
    layout = build_layout(16, tp=2, ep=8)  # ep groups [0, 1, ..., 7] and [8, ..., 15]
    nodes, rails = ep_hop_groups(layout.groups["ep"], 4)
    assert nodes == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert rails == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    # Expert ranks tp apart: nodes and rails follow the EP group's own order.
    nodes, rails = ep_hop_groups([[0, 2, 4, 6], [1, 3, 5, 7]], 2)
    assert nodes == [[0, 2], [1, 3], [4, 6], [5, 7]] and rails == [[0, 4], [1, 5], [2, 6], [3, 7]]
    with pytest.raises(LayoutError, match="3 EP ranks per node"):
        ep_hop_groups(layout.groups["ep"], 3)


def test_pipeline_groups_and_dualpipe_stage_copies():
    layout = build_layout(16, tp=2, ep=2, pp=4, stage_copies=copy_groups("dualpipe", 4))
    assert layout.groups["pp"][0] == [0, 4, 8, 12]
    # Ranks at pp positions r and pp-1-r of one pipeline hold the same stages.
    assert [0, 12] in layout.groups["stage_copy"] and [4, 8] in layout.groups["stage_copy"]
    assert layout.groups["embedding"][0] == [0, 12]
    assert layout.pp_rank(9) == 2 and layout.rank_at(9, 0) == 1


def test_order_changes_placement():
    # dp fastest: data-parallel replicas are neighbours, tp ranks are strided.
    layout = build_layout(8, tp=2, pp=1, order="dp-tp-pp")
    assert layout.groups["dp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.groups["tp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def _sizes():
    for world in (1, 8, 64, 512, 4096):
        for tp, pp, ep, etp in itertools.product((1, 2, 8), (1, 2, 4, 16), (1, 2, 8, 64), (1, 2)):
            if not layout_errors(world, tp, ep, etp, pp):
                yield world, tp, pp, ep, etp


@pytest.mark.parametrize("world,tp,pp,ep,etp", list(_sizes())[::7])
def test_group_algebra(world, tp, pp, ep, etp):
    layout = build_layout(world, tp=tp, ep=ep, expert_tp=etp, pp=pp)
    dp = world // (tp * pp)
    expected_size = {"tp": tp, "pp": pp, "dp": dp, "mp": tp * pp, "ep": ep, "expert_tp": etp,
                     "expert_dp": world // (pp * ep * etp), "tp_dp": tp * dp}
    for kind, size in expected_size.items():
        groups = layout.groups[kind]
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(world)), f"{kind}: every rank exactly once"
        assert all(len(g) == size for g in groups), kind
    sets = {k: [set(g) for g in v] for k, v in layout.groups.items()}
    for r in range(0, world, max(1, world // 64)):
        mine = {k: set(layout.group_of(k, r)) for k in expected_size}
        # A dense tp group and a dp group meet in exactly one rank; tp x dp is a stage.
        assert mine["tp"] & mine["dp"] == {r} and mine["tp"] & mine["pp"] == {r}
        assert mine["tp"] | mine["dp"] <= mine["tp_dp"]
        # Experts fold over the ranks of one pipeline stage.
        assert mine["ep"] <= mine["tp_dp"] and mine["expert_dp"] <= mine["tp_dp"]
        assert mine["ep"] & mine["expert_dp"] == {r} and mine["ep"] & mine["expert_tp"] == {r}
        assert len(mine["ep"] | mine["expert_dp"] | mine["expert_tp"]) <= tp * dp
        # mp = tp x pp
        assert mine["mp"] == {x for t in mine["tp"] for x in layout.group_of("pp", t)}
    assert len(sets["ep"]) * ep == world


def test_errors_name_the_fields():
    errors = layout_errors(12, tp=2, ep=1, expert_tp=1, pp=4)
    assert len(errors) == 1 and "parallel.tp" in errors[0] and "parallel.pp" in errors[0] and "12" in errors[0]
    errors = layout_errors(8, tp=2, ep=3, expert_tp=1, pp=1)
    assert "parallel.ep" in errors[0] and "tp * dp" in errors[0]
    with pytest.raises(LayoutError, match="parallel.order"):
        build_layout(8, order="tp-dp")
