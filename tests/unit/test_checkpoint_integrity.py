"""Checkpoint integrity, single process: every file checksummed, a damaged
checkpoint set aside (never deleted) in favour of the newest one that
verifies, a refusal instead of a silent restart, saves and pruning that
leave newer checkpoints alone."""
import hashlib
import json
import logging

import pytest
import torch

from mtrain.train import checkpoint_files
from mtrain.train.checkpoint import Checkpointer, ResumeRefused
from mtrain.train.checkpoint_files import (LATEST, MARKER, CorruptCheckpointError, step_dir, step_dirs,
                                           verify_checkpoint)
from mtrain.train.checkpoint_resume import apply_plan, plan_resume
from mtrain.train.checksums import file_digest, shares
from mtrain.train.state import TensorState
from mtrain.testing.state import DictState

N = 400_000  # fp32: a 1.6 MB data file, above the 1 MiB under which files used to be checksummed


def tensors(step):
    return {"w": torch.full((N,), float(step)), "b": torch.arange(8.0) + step}


def save(root, step, keep_last=0):
    return Checkpointer(root, keep_last=keep_last).save(
        step, {"model": TensorState(tensors(step))}, {"extra": DictState({"step": step})}).wait()


def data_file(path):
    return max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)


def flip_4k(path):
    """Overwrite 4 KiB in the middle of the checkpoint's largest data file,
    keeping its size."""
    file = data_file(path)
    assert file.stat().st_size > 1 << 20
    with open(file, "r+b") as f:
        f.seek(file.stat().st_size // 2)
        block = f.read(4096)
        f.seek(-len(block), 1)
        f.write(bytes(b ^ 0xFF for b in block))
    return file


def tree(root):
    """Every file under ``root``: relative path -> SHA-256."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _original_name(rel):
    first, _, rest = rel.partition("/")
    return "/".join(filter(None, [first.split(".")[0], rest]))


def resume(root, mode="latest", allow_fresh_start=False):
    """What a run does at start: plan, load the chosen checkpoint, make way.
    (step, loaded extra state or None, what was set aside)."""
    checkpointer = Checkpointer(root)
    plan = plan_resume(checkpointer, mode)
    step, extra = 0, None
    if plan.path is not None:
        box = DictState()
        checkpointer.load(plan.path, {"model": TensorState(tensors(0))}, {"extra": box})
        step, extra = box.state["step"], box.state
    return step, extra, apply_plan(checkpointer, plan, step, allow_fresh_start)


def test_every_file_has_a_checksum_and_a_4k_flip_in_a_large_file_is_named(tmp_path):
    path = save(tmp_path, 1)
    files = json.loads((path / MARKER).read_text())["files"]
    assert all("sha256" in entry for entry in files.values()), files
    assert files[data_file(path).name]["sha256"] == file_digest(data_file(path))
    flipped = flip_4k(path)
    with pytest.raises(CorruptCheckpointError, match=f"{flipped}: checksum differs"):
        verify_checkpoint(path)
    # Split over two ranks: the rank whose share holds the file finds it, the other does not read it.
    outcomes = []
    for part in range(2):
        try:
            verify_checkpoint(path, part=part, parts=2)
            outcomes.append("ok")
        except CorruptCheckpointError as e:
            outcomes.append(str(e))
    assert sorted(o == "ok" for o in outcomes) == [False, True]


def test_a_damaged_latest_is_set_aside_and_the_previous_checkpoint_resumed(tmp_path, caplog):
    for step in (1, 2, 3):
        save(tmp_path, step)
    good = {step: tree(step_dir(tmp_path, step)) for step in (1, 2)}
    flipped = flip_4k(step_dir(tmp_path, 3))
    damaged = tree(step_dir(tmp_path, 3))
    with caplog.at_level(logging.WARNING):
        step, extra, aside = resume(tmp_path)
    assert step == 2 and extra == {"step": 2}
    assert [p.name.rsplit("-", 1)[0] for p in aside] == ["step_000003.corrupt"]
    assert not step_dir(tmp_path, 3).exists() and tree(aside[0]) == damaged  # moved, not deleted
    assert {s: tree(step_dir(tmp_path, s)) for s in (1, 2)} == good
    assert (tmp_path / LATEST).read_text().strip() == "step_000002"
    assert str(flipped) in caplog.text and aside[0].name in caplog.text
    # The set-aside directory is never a candidate again, nor pruned.
    save(tmp_path, 3, keep_last=1)
    assert aside[0].is_dir() and [p.name for p in step_dirs(tmp_path)] == ["step_000003"]


def two_unloadable_checkpoints(root):
    """step 1 without its COMPLETE marker, step 2 (named in latest) damaged; the tree's hashes."""
    for step in (1, 2):
        save(root, step)
    flip_4k(step_dir(root, 2))
    (step_dir(root, 1) / MARKER).unlink()
    return tree(root)


def test_no_checkpoint_verifies_refuses_and_changes_nothing(tmp_path):
    before = two_unloadable_checkpoints(tmp_path)
    with pytest.raises(ResumeRefused) as refused:
        resume(tmp_path)
    message = str(refused.value)
    assert "step_000002 (named in latest)" in message and "checksum differs" in message
    assert "step_000001" in message and "no COMPLETE marker" in message
    assert "checkpoint.allow_fresh_start=true" in message
    assert tree(tmp_path) == before


def test_a_fresh_start_sets_every_checkpoint_aside(tmp_path):
    before = two_unloadable_checkpoints(tmp_path)
    step, extra, aside = resume(tmp_path, allow_fresh_start=True)
    assert step == 0 and extra is None
    assert sorted(p.name.rsplit("-", 1)[0] for p in aside) == [
        "latest.superseded", "step_000001.corrupt", "step_000002.corrupt"]
    assert not step_dirs(tmp_path) and not (tmp_path / LATEST).exists()
    # Same files, same bytes, under the new names ("step_000001.corrupt-<time>/..." was "step_000001/...").
    assert {_original_name(k): v for k, v in tree(tmp_path).items()} == before
    # The new run's saves and pruning leave them alone.
    for step in (1, 2, 3):
        save(tmp_path, step, keep_last=1)
    assert all(p.exists() for p in aside) and [p.name for p in step_dirs(tmp_path)] == ["step_000003"]


def test_resume_none_over_checkpoints_is_refused_unless_allowed(tmp_path):
    save(tmp_path, 1)
    before = tree(tmp_path)
    with pytest.raises(ResumeRefused, match=r"checkpoint.resume=none.*checkpoint.allow_fresh_start=true"):
        resume(tmp_path, "none")
    assert tree(tmp_path) == before
    step, _, aside = resume(tmp_path, "none", allow_fresh_start=True)
    assert step == 0 and sorted(p.name.split("-")[0] for p in aside) == ["latest.superseded", "step_000001.superseded"]
    # An empty directory, or only leftovers of an interrupted save, is a normal fresh start.
    empty = tmp_path / "empty"
    (empty / "step_000001.tmp").mkdir(parents=True)
    assert resume(empty, "none") == (0, None, []) == resume(empty)


def test_latest_pointing_back_keeps_the_newer_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step)
    newer = {step: tree(step_dir(tmp_path, step)) for step in (3, 4)}
    (tmp_path / LATEST).write_text("step_000002\n")
    step, _, aside = resume(tmp_path)
    assert step == 2
    assert sorted(p.name.rsplit("-", 1)[0] for p in aside) == ["step_000003.superseded", "step_000004.superseded"]
    for step in (3, 4, 5, 6):  # the run goes on and saves over the same step numbers
        save(tmp_path, step, keep_last=2)
    assert [p.name for p in step_dirs(tmp_path)] == ["step_000005", "step_000006"]
    kept = {int(p.name[5:11]): tree(p) for p in aside}
    assert kept == newer


def test_explicit_resume_path_that_does_not_verify_is_refused(tmp_path):
    path = save(tmp_path, 1)
    flip_4k(path)
    with pytest.raises(ResumeRefused, match=r"checkpoint.resume=.*step_000001 does not verify.*checksum differs"):
        resume(tmp_path, str(path))
    assert path.is_dir()


def test_pruning_counts_only_checkpoints_that_verify_and_spares_newer_ones(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step)
    with open(data_file(step_dir(tmp_path, 3)), "r+b") as f:
        f.truncate(100)  # fails the quick check: does not count toward keep_last
    save(tmp_path, 4, keep_last=2)
    assert [p.name for p in step_dirs(tmp_path)] == ["step_000002", "step_000003", "step_000004"]
    # Saving an older step (a converter, a rollback) never prunes what is newer than it.
    checkpoint_files.prune(tmp_path, 1, step_dir(tmp_path, 2))
    assert [p.name for p in step_dirs(tmp_path)] == ["step_000002", "step_000003", "step_000004"]


def test_an_older_manifest_without_large_file_checksums_verifies_by_size(tmp_path, caplog):
    path = save(tmp_path, 1)
    manifest = json.loads((path / MARKER).read_text())
    del manifest["files"][data_file(path).name]["sha256"]  # as format 2 wrote files over 1 MiB
    (path / MARKER).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        assert verify_checkpoint(path)["step"] == 1
    assert "no checksum" in caplog.text and data_file(path).name in caplog.text


def test_checksums_stream_and_shares_cover_every_file_once(tmp_path, monkeypatch):
    file = tmp_path / "f"
    file.write_bytes(bytes(range(256)) * 1000)
    monkeypatch.setattr("mtrain.train.checksums.BLOCK", 1000)
    assert file_digest(file) == hashlib.sha256(file.read_bytes()).hexdigest()
    sizes = {f"f{i}": (i * 37) % 11 + 1 for i in range(20)}
    split = shares(sizes, 3)
    assert sorted(n for part in split for n in part) == sorted(sizes)
    loads = [sum(sizes[n] for n in part) for part in split]
    assert max(loads) - min(loads) <= max(sizes.values())
    assert shares(sizes, 3) == split and shares(sizes, 1) == [sorted(sizes, key=lambda n: (-sizes[n], n))]
