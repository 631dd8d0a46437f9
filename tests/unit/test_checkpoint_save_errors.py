"""A save that fails for lack of space, single process: wherever the disk
fills (DCP data, DCP metadata, an extra file, the manifest, ``latest``), the
previous checkpoint and ``latest`` are untouched, no temporary directory or
partial file is left, and the error is one line naming the directory, the
free space and the fix. The next save works once there is room."""
import errno
import hashlib
import os

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs

from mtrain.train import checkpoint_files
from mtrain.train.checkpoint import Checkpointer, CheckpointSaveError
from mtrain.train.checkpoint_files import LATEST, MARKER, find_latest, step_dir, tmp_dir, verify_checkpoint
from mtrain.train.state import TensorState
from mtrain.testing.state import DictState


def no_space(name="file"):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(name))


def save(checkpointer, step):
    tensors = {"w": torch.full((50_000,), float(step))}
    return checkpointer.save(step, {"model": TensorState(tensors)}, {"extra": DictState({"step": step})}).wait()


def tree(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


class FillingFile:
    """A file whose disk fills after ``room`` bytes."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.room = 0
            raise no_space(self.f.name)
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_disk(monkeypatch, where):
    """Make the named write of the next save fail with ENOSPC (after writing part of it)."""
    if where == "data":
        def write_item(transforms, stream, *args, **kwargs):
            stream.write(b"\0" * 4096)
            raise no_space(getattr(stream, "name", "data"))
        monkeypatch.setattr(dcp_fs, "_write_item", write_item)
    elif where == "metadata":
        def finish(self, metadata, results):
            (self.path / ".metadata.tmp").write_bytes(b"\0" * 100)
            raise no_space(self.path / ".metadata.tmp")
        monkeypatch.setattr(dcp_fs.FileSystemWriter, "finish", finish)
    elif where == "extra":
        real_save = torch.save

        def torch_save(obj, f, *args, **kwargs):
            if str(f).endswith(".pt"):
                raise no_space(f)
            return real_save(obj, f, *args, **kwargs)
        monkeypatch.setattr(torch, "save", torch_save)
    else:  # "manifest" or "latest": the real write_atomic, on a disk that fills mid-write
        def fake_open(path, mode="r", *args, **kwargs):
            f = open(path, mode, *args, **kwargs)
            target = MARKER if where == "manifest" else LATEST
            return FillingFile(f, 3) if "w" in mode and f".{target}." in str(path) else f
        monkeypatch.setattr(checkpoint_files, "open", fake_open, raising=False)


@pytest.mark.parametrize("where", ["data", "metadata", "extra", "manifest", "latest"])
def test_a_full_disk_leaves_the_previous_checkpoint_and_latest(tmp_path, monkeypatch, where):
    checkpointer = Checkpointer(tmp_path, keep_last=1)
    first = save(checkpointer, 1)
    before = tree(first)
    fill_disk(monkeypatch, where)
    with pytest.raises(CheckpointSaveError) as failed:
        save(checkpointer, 2)
    error = failed.value
    assert error.no_space and error.step == 2
    message = str(error)
    assert "\n" not in message
    assert "checkpoint of step 2 not saved: no space left" in message
    assert f"{tmp_path} has " in message and " free of " in message
    assert "checkpoint.dir" in message and "step_000001 (named in latest) is intact" in message
    assert (tmp_path / LATEST).read_text().strip() == first.name
    assert tree(first) == before and find_latest(tmp_path) == first
    assert not tmp_dir(tmp_path, 2).exists()
    assert not [p for p in tmp_path.rglob("*.partial")]
    if where == "latest":  # sealed and published, not committed: a resume ignores it
        verify_checkpoint(step_dir(tmp_path, 2))
    else:
        assert not step_dir(tmp_path, 2).exists()
    # Room again: the next save commits, and pruning works as usual.
    monkeypatch.undo()
    third = save(checkpointer, 3)
    assert find_latest(tmp_path) == third and not first.exists()


def test_a_full_disk_during_an_async_save_is_reported_by_wait(tmp_path, monkeypatch):
    checkpointer = Checkpointer(tmp_path, async_save=True)
    first = save(checkpointer, 1)
    fill_disk(monkeypatch, "data")
    tensors = {"w": torch.zeros(10)}
    handle = checkpointer.save(2, {"model": TensorState(tensors)}, {"extra": DictState({"step": 2})})
    with pytest.raises(CheckpointSaveError, match="no space left"):
        handle.wait()
    assert (tmp_path / LATEST).read_text().strip() == first.name
    assert not tmp_dir(tmp_path, 2).exists()


def test_other_storage_errors_name_the_error_and_the_filesystem(tmp_path, monkeypatch):
    checkpointer = Checkpointer(tmp_path)
    save(checkpointer, 1)

    def write_item(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO), "data")
    monkeypatch.setattr(dcp_fs, "_write_item", write_item)
    with pytest.raises(CheckpointSaveError, match=r"a storage error .*Input/output error.*check the filesystem") as e:
        save(checkpointer, 2)
    assert not e.value.no_space and not tmp_dir(tmp_path, 2).exists()


def test_a_resume_warns_when_the_disk_cannot_hold_another_checkpoint(tmp_path, monkeypatch, caplog):
    from types import SimpleNamespace

    from mtrain.train import checkpoint_resume

    checkpointer = Checkpointer(tmp_path)
    save(checkpointer, 1)
    plan = checkpoint_resume.plan_resume(checkpointer, "latest")
    monkeypatch.setattr(checkpoint_resume.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with caplog.at_level("WARNING"):
        checkpoint_resume.apply_plan(checkpointer, plan, 1, allow_fresh_start=False)
    assert f"{tmp_path} has 0.0 GiB free, and the next checkpoint needs about" in caplog.text
