"""The checkpoint directory protocol, single process: what a resume picks,
what verification rejects, pruning, and crashes at each point of a save."""
import json
import logging

import pytest
import torch

from mtrain.train import checkpoint_files
from mtrain.train.checkpoint import Checkpointer
from mtrain.train.checkpoint_files import (LATEST, MARKER, CorruptCheckpointError, find_latest, step_dir,
                                           tmp_dir, verify_checkpoint)
from mtrain.testing.state import DictState
from mtrain.train.state import TensorState


def save_checkpoint(root, step, tensors, extra, **kwargs):
    return Checkpointer(root, **kwargs).save(step, {"model": TensorState(tensors)}, {"extra": DictState(extra)})


def load_checkpoint(path, tensors):
    """Fill ``tensors`` in place; the saved extra dict."""
    box = DictState()
    Checkpointer(path.parent).load(path, {"model": TensorState(tensors)}, {"extra": box})
    return box.state


def save(root, step, keep_last=0):
    tensors = {"w": torch.full((64,), float(step)), "layers.0.b": torch.arange(8.0) + step}
    return save_checkpoint(root, step, tensors, {"step": step}, keep_last=keep_last).wait()


def data_file(path):
    return next(path.glob("*.distcp"))


class Crash(Exception):
    pass


@pytest.fixture
def crash_at(monkeypatch):
    """Make a save stop (as if the process died) at the named point."""
    def arm(point):
        def hook(reached):
            if reached == point:
                raise Crash(point)
        monkeypatch.setattr(checkpoint_files, "fault_hook", hook)
    return arm


def test_save_then_load_round_trip(tmp_path):
    path = save(tmp_path, 7)
    assert path == step_dir(tmp_path, 7) and (tmp_path / LATEST).read_text().strip() == path.name
    manifest = verify_checkpoint(path)
    assert manifest["step"] == 7 and manifest["world_size"] == 1
    assert {".metadata", "extra/rank_00000.pt"} <= set(manifest["files"])
    assert "sha256" in manifest["files"][".metadata"]
    loaded = {"w": torch.zeros(64), "layers.0.b": torch.zeros(8)}
    assert load_checkpoint(path, loaded) == {"step": 7}
    assert torch.equal(loaded["w"], torch.full((64,), 7.0))
    assert torch.equal(loaded["layers.0.b"], torch.arange(8.0) + 7)


def test_find_latest_ignores_tmp_and_incomplete_dirs(tmp_path):
    assert find_latest(tmp_path) is None
    good = save(tmp_path, 1)
    # An interrupted save of step 2 and a final-named directory without a marker.
    (tmp_dir(tmp_path, 2)).mkdir()
    (tmp_dir(tmp_path, 2) / ".metadata").write_bytes(b"x")
    step_dir(tmp_path, 3).mkdir()
    (step_dir(tmp_path, 3) / ".metadata").write_bytes(b"x")
    assert find_latest(tmp_path) == good
    (tmp_path / LATEST).unlink()
    assert find_latest(tmp_path) == good


def test_find_latest_falls_back_when_latest_is_broken(tmp_path, caplog):
    first = save(tmp_path, 1)
    second = save(tmp_path, 2)
    assert find_latest(tmp_path) == second
    with open(data_file(second), "r+b") as f:
        f.truncate(10)
    with caplog.at_level(logging.WARNING):
        assert find_latest(tmp_path) == first
    assert "truncated" in caplog.text and LATEST in caplog.text


@pytest.mark.parametrize("damage,message", [
    ("truncate_data", "truncated"),
    ("corrupt_metadata", "checksum"),
    ("delete_metadata", "missing"),
    ("delete_marker", MARKER),
    ("garble_marker", "unreadable manifest"),
    ("delete_extra", "rank_00000.pt"),
])
def test_verify_detects_damage(tmp_path, damage, message):
    path = save(tmp_path, 1)
    if damage == "truncate_data":
        with open(data_file(path), "r+b") as f:
            f.truncate(f.seek(0, 2) - 1)
    elif damage == "corrupt_metadata":
        raw = bytearray((path / ".metadata").read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (path / ".metadata").write_bytes(bytes(raw))
    elif damage == "delete_metadata":
        (path / ".metadata").unlink()
    elif damage == "delete_marker":
        (path / MARKER).unlink()
    elif damage == "garble_marker":
        (path / MARKER).write_text("{not json")
    elif damage == "delete_extra":
        (path / "extra" / "rank_00000.pt").unlink()
    with pytest.raises(CorruptCheckpointError, match=message):
        verify_checkpoint(path)
    # A damaged checkpoint is never loaded.
    loaded = {"w": torch.zeros(64), "layers.0.b": torch.zeros(8)}
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint(path, loaded)
    assert torch.equal(loaded["w"], torch.zeros(64))


def test_keep_last_prunes_only_older_complete_checkpoints(tmp_path):
    for step in range(1, 5):
        save(tmp_path, step, keep_last=2)
    assert [p.name for p in checkpoint_files.step_dirs(tmp_path)] == ["step_000003", "step_000004"]
    # keep_last=0 keeps everything.
    for step in range(5, 8):
        save(tmp_path, step, keep_last=0)
    assert len(checkpoint_files.step_dirs(tmp_path)) == 5


@pytest.mark.parametrize("point", ["written", "sealed", "published"])
def test_crash_before_latest_keeps_previous_checkpoint(tmp_path, crash_at, point):
    first = save(tmp_path, 1, keep_last=1)
    crash_at(point)
    with pytest.raises((Crash, RuntimeError), match=point):
        save(tmp_path, 2, keep_last=1)
    # `latest` is written last: until then a resume picks the previous checkpoint,
    # which pruning has not touched either.
    assert (tmp_path / LATEST).read_text().strip() == first.name
    assert find_latest(tmp_path) == first
    verify_checkpoint(first)
    if point == "published":
        verify_checkpoint(step_dir(tmp_path, 2))  # complete, just not committed
    else:
        assert tmp_dir(tmp_path, 2).is_dir() and not step_dir(tmp_path, 2).exists()
    checkpoint_files.fault_hook = None
    third = save(tmp_path, 3, keep_last=1)
    assert find_latest(tmp_path) == third
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, third.name]


def test_saving_a_step_again_replaces_it_and_sets_the_first_aside(tmp_path):
    first = save(tmp_path, 1)
    first_manifest = (first / MARKER).read_text()
    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {"again": True}).wait()
    loaded = {"w": torch.zeros(3)}
    assert load_checkpoint(path, loaded) == {"again": True}
    assert torch.equal(loaded["w"], torch.ones(3))
    assert json.loads((path / MARKER).read_text())["step"] == 1
    # The earlier save of the step is never deleted: it is set aside, intact.
    aside = [p for p in tmp_path.iterdir() if p.name not in (LATEST, path.name)]
    assert [p.name.split("-")[0] for p in aside] == [path.name + ".superseded"]
    assert (aside[0] / MARKER).read_text() == first_manifest
    verify_checkpoint(aside[0])


def test_async_save_finalises_in_the_background(tmp_path):
    tensors = {"w": torch.arange(5.0)}
    checkpointer = Checkpointer(tmp_path, async_save=True)
    handle = checkpointer.save(4, {"model": TensorState(tensors)}, {"extra": DictState({"step": 4})})
    tensors["w"].zero_()
    assert handle.wait() == step_dir(tmp_path, 4) == find_latest(tmp_path)
    assert checkpointer.wait() == handle.path  # the checkpointer joins its save in flight too
    loaded = {"w": torch.zeros(5)}
    load_checkpoint(handle.path, loaded)
    assert torch.equal(loaded["w"], torch.arange(5.0))


def test_a_checkpoint_of_another_format_is_refused_by_name(tmp_path):
    path = save(tmp_path, 3)
    marker = path / MARKER
    manifest = json.loads(marker.read_text())
    manifest["format"] = 1
    marker.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"checkpoint format 1, this mtrain reads format 2"):
        load_checkpoint(path, {"w": torch.zeros(64), "layers.0.b": torch.zeros(8)})
