import pytest

from mtrain.config.loading import load_config
from mtrain.model.partition import balanced_layer_counts, stage_layers, stage_roles
from mtrain.train.preflight import config_errors


def test_even_split_is_contiguous():
    assert stage_layers(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert stage_layers(3, 1) == [[0, 1, 2]]


@pytest.mark.parametrize("layers,stages,expected", [
    (10, 4, [2, 3, 3, 2]),   # the two middle stages take the extras
    (11, 4, [3, 3, 3, 2]),   # then the embedding stage, before the head stage
    (5, 3, [2, 2, 1]),
    (7, 5, [1, 2, 2, 1, 1]),
    (61, 16, [3] + [4] * 13 + [3] * 2),
])
def test_uneven_split_loads_middle_stages_first(layers, stages, expected):
    assert balanced_layer_counts(layers, stages) == expected


@pytest.mark.parametrize("layers,stages", [(61, 16), (61, 8), (27, 4), (4, 4), (100, 7)])
def test_balanced_split_covers_every_layer_once(layers, stages):
    split = stage_layers(layers, stages)
    assert [i for stage in split for i in stage] == list(range(layers))
    sizes = [len(s) for s in split]
    assert max(sizes) - min(sizes) <= 1
    assert sizes[-1] == min(sizes)


def test_explicit_layout():
    assert stage_layers(6, 3, [1, 3, 2]) == [[0], [1, 2, 3], [4, 5]]
    # A stage may hold no decoder layer (e.g. only the head).
    assert stage_layers(4, 3, [2, 2, 0]) == [[0, 1], [2, 3], []]


@pytest.mark.parametrize("layout,match", [
    ([2, 2], "has 2 entries"),
    ([2, 2, 3], "sum to 7"),
    ([-1, 4, 3], "non-negative"),
])
def test_bad_layouts_are_rejected(layout, match):
    with pytest.raises(ValueError, match=match) as err:
        stage_layers(6, 3, layout)
    assert "parallel.pipeline_layout" in str(err.value)


def test_too_few_layers_for_stages():
    with pytest.raises(ValueError, match="cannot be split over 5"):
        stage_layers(4, 5)


def test_layout_rules_agree_with_config_validation():
    good = load_config(["parallel.pp=2", "parallel.schedule=1f1b", "parallel.pipeline_layout=[3,1]"])
    bad = load_config(["parallel.pp=2", "parallel.schedule=1f1b", "parallel.pipeline_layout=[3,2]"])
    assert config_errors(good) == []
    assert stage_layers(4, 2, list(good.parallel.pipeline_layout)) == [[0, 1, 2], [3]]
    assert config_errors(bad)
    with pytest.raises(ValueError):
        stage_layers(4, 2, list(bad.parallel.pipeline_layout))


def test_stage_roles():
    assert stage_roles(3) == [
        {"embedding": True, "head": False, "mtp": False},
        {"embedding": False, "head": False, "mtp": False},
        {"embedding": False, "head": True, "mtp": True},
    ]
    assert stage_roles(1, has_mtp=False) == [{"embedding": True, "head": True, "mtp": False}]
