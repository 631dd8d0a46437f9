"""A failing mtrain-train says one clear line (no traceback on the console),
names the file, field or rank and the fix, and exits non-zero; the rank's log
keeps the line (and, for an unexpected error, the traceback)."""
import subprocess
import sys

import numpy as np

from mtrain.data.indexed import IndexedDatasetWriter, bin_path

BASE = ["parallel=single", "cluster.gpus_per_node=1", "logging.wandb=false", "logging.progress=false",
        "data.seq_len=16", "train.micro_batch_size=1", "train.steps=2"]


def train(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "mtrain.cli.train", *BASE, f"run_dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)


def test_missing_data_and_a_misspelt_resume_are_config_errors_before_anything_runs(tmp_path):
    out = train(tmp_path, f"data.path={tmp_path / 'nope'}", "checkpoint.resume=lastest")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert f"data.path={tmp_path / 'nope'}: {tmp_path / 'nope'}.bin and {tmp_path / 'nope'}.idx not found" in out.stderr
    assert "checkpoint.resume=lastest: no such checkpoint; use latest, none" in out.stderr


def test_damaged_token_ids_name_the_file_and_offset_on_the_console_and_in_the_log(tmp_path):
    with IndexedDatasetWriter(tmp_path / "corpus", 1024) as writer:
        writer.add_document(np.arange(400) % 1000)
    data = bytearray(bin_path(tmp_path / "corpus").read_bytes())
    data[2 * 5:2 * 5 + 2] = (60000).to_bytes(2, "little")
    bin_path(tmp_path / "corpus").write_bytes(bytes(data))
    out = train(tmp_path, f"data.path={tmp_path / 'corpus'}", "train.steps=30")
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    line = "token id 60000 at token offset 5 (byte 10) is outside the vocabulary of 1024 ids"
    assert line in out.stderr and "rank 0: " in out.stderr
    assert line in (tmp_path / "run" / "logs" / "rank0.log").read_text()


def test_a_finished_run_started_again_says_it_is_complete(tmp_path):
    assert train(tmp_path, "checkpoint.interval=2").returncode == 0
    again = train(tmp_path, "checkpoint.interval=2")
    assert again.returncode == 0, again.stderr
    assert "the run is complete: its checkpoint is at step 2 of train.steps=2" in again.stderr
