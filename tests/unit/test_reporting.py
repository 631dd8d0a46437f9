"""Step metrics and their reporting (mtrain/train/metrics.py, reporting.py):
arithmetic on known numbers, metrics.jsonl round trips, the console status
line, and real offline wandb and TensorBoard runs read back from disk."""
import io
import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch

from mtrain.config.loading import load_config
from mtrain.train import metrics as metrics_module
from mtrain.train.metrics import (StepMetrics, StepTimer, device_peak_tflops, expert_load_imbalance,
                                  peak_memory_bytes, throughput)
from mtrain.train.reporting import Reporter, render_expert_load

LOADS = {"layers.1.mlp": [1.0, 2.0, 3.0, 4.0], "layers.10.mlp": [4.0, 4.0, 4.0, 4.0],
         "layers.2.mlp": [0.0, 0.0, 0.0, 8.0]}


def config(*overrides):
    return load_config(["train.steps=4", "logging.wandb=false", "logging.progress=false", "logging.log_interval=1", *overrides])


def step_metrics(step: int, **overrides) -> dict:
    """A step as the trainer reports it."""
    values = dict(step=step, loss=5.0 / step, lm_loss=4.0 / step, aux_loss=0.01, grad_norm=0.5, lr=1e-3,
                  tokens_per_s=4096.0, tflops_per_device=6.144, mfu=0.06144, bubble_pct=12.5,
                  expert_load_imbalance=None, peak_memory_gb=1.5, step_time_s=1.5, skipped=False)
    values.update(overrides)
    return values


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- metrics ----------------------------------------------------------------------
def test_throughput_and_mfu_on_known_numbers():
    # 8192 tokens in 2 s = 4096 tokens/s; 6e9 FLOPs/token over 4 devices = 6.144 TFLOP/s each.
    speed = throughput(8192, 2.0, 6e9, 4, 100.0)
    assert speed == pytest.approx({"tokens_per_s": 4096.0, "tflops_per_device": 6.144, "mfu": 0.06144})


def test_mfu_uses_the_device_table_when_the_peak_is_not_configured(monkeypatch):
    monkeypatch.setattr(metrics_module, "local_device_peak_tflops", lambda dtype: None)
    assert throughput(8192, 2.0, 6e9, 4, None)["mfu"] is None
    monkeypatch.setattr(metrics_module, "local_device_peak_tflops", lambda dtype: 61.44)
    assert throughput(8192, 2.0, 6e9, 4, None)["mfu"] == pytest.approx(0.1)


def test_mfu_peak_is_the_one_of_the_dtype_trained_in(monkeypatch):
    monkeypatch.setattr(metrics_module, "local_device_peak_tflops", lambda dtype: {"bf16": 61.44, "fp32": 30.72}[dtype])
    assert throughput(8192, 2.0, 6e9, 4, None, "bf16")["mfu"] == pytest.approx(0.1)
    assert throughput(8192, 2.0, 6e9, 4, None, "fp32")["mfu"] == pytest.approx(0.2)
    # A configured peak is used whatever the dtype.
    assert throughput(8192, 2.0, 6e9, 4, 100.0, "fp32")["mfu"] == pytest.approx(0.06144)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None), (None, None),
])
def test_device_peak_table(name, peak):
    assert device_peak_tflops(name) == peak


@pytest.mark.parametrize("name, bf16, fp32", [
    ("NVIDIA H100 80GB HBM3", 989.0, 494.5), ("NVIDIA H100 PCIe", 756.0, 378.0), ("NVIDIA H100 NVL", 835.0, 417.5),
    ("NVIDIA H200", 989.0, 494.5), ("NVIDIA H200 NVL", 835.0, 417.5), ("NVIDIA H800", 989.0, 494.5),
    ("NVIDIA H800 PCIe", 756.0, 378.0), ("NVIDIA A100-SXM4-80GB", 312.0, 156.0), ("NVIDIA A100 80GB PCIe", 312.0, 156.0),
])
def test_device_peak_by_dtype(name, bf16, fp32):
    # fp32 runs use TF32 tensor cores: half the bf16 dense peak on these GPUs.
    assert (device_peak_tflops(name, "bf16"), device_peak_tflops(name, "fp32")) == (bf16, fp32)
    assert device_peak_tflops("Tesla T4", "fp32") is None


def test_step_timer_uses_perf_counter_on_cpu(monkeypatch):
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(torch.cuda, "Event", None)  # any CUDA event use fails
    timer = StepTimer(torch.device("cpu"))
    timer.start()
    timer.stop()
    assert timer.seconds() == 2.5


def test_step_timer_uses_cuda_events_on_cuda(monkeypatch):
    recorded = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            recorded.append(self)

        def synchronize(self):
            pass

        def elapsed_time(self, end):  # milliseconds
            assert recorded == [self, end]
            return 1500.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(metrics_module.time, "perf_counter", None)  # the host clock is not used
    timer = StepTimer(torch.device("cuda", 0))
    timer.start()
    timer.stop()
    assert timer.seconds() == 1.5


def test_expert_load_imbalance_is_max_over_mean_per_layer():
    loads = torch.tensor([[1, 2, 3, 4], [4, 4, 4, 4], [0, 0, 0, 8], [0, 0, 0, 0]])
    got = expert_load_imbalance(loads)
    assert got[:3] == pytest.approx([1.6, 1.0, 4.0])
    assert math.isnan(got[3])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_on_cpu_is_the_process_high_water_mark_in_bytes():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    high_water_mark = int(line.split()[1]) * 1024
    # getrusage and /proc account slightly differently; a unit slip would be 1024x.
    assert peak_memory_bytes() == pytest.approx(high_water_mark, rel=0.1)


def test_step_metrics_rejects_unknown_and_missing_keys():
    with pytest.raises(ValueError, match="unknown step metrics.*'los'"):
        StepMetrics.from_mapping({**step_metrics(1), "los": 1.0})
    incomplete = step_metrics(1)
    del incomplete["grad_norm"]
    with pytest.raises(ValueError, match="grad_norm"):
        StepMetrics.from_mapping(incomplete)


# -- metrics.jsonl --------------------------------------------------------------
def test_jsonl_round_trip_and_per_layer_imbalance(tmp_path):
    reporter = Reporter(tmp_path, config(), stream=io.StringIO())
    for step in (1, 2):
        # A value computed from one stage's layers is replaced by the full table's.
        reporter.log(step_metrics(step, expert_load_imbalance=1.6), expert_loads=LOADS)
    reporter.log(step_metrics(3, loss=math.nan, grad_norm=math.inf, skipped=True))
    reporter.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] == 2.5 and records[1]["bubble_pct"] == 12.5
    assert records[0]["expert_load_imbalance_per_layer"] == pytest.approx(
        {"layers.1.mlp": 1.6, "layers.2.mlp": 4.0, "layers.10.mlp": 1.0})
    assert records[0]["expert_load_imbalance"] == 4.0
    # A skipped step's non-finite values are written as null (strict JSON).
    assert records[2]["skipped"] is True and records[2]["loss"] is None and records[2]["grad_norm"] is None


def test_resume_drops_lines_after_the_resumed_step_and_a_cut_line(tmp_path):
    reporter = Reporter(tmp_path, config(), stream=io.StringIO())
    for step in (1, 2, 3):
        reporter.log(step_metrics(step))
    reporter.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # a crash mid-line
    resumed = Reporter(tmp_path, config(), stream=io.StringIO(), start_step=2)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    resumed.log(step_metrics(3, loss=9.0))
    resumed.truncate_after(3)
    resumed.log(step_metrics(4))
    resumed.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 5.0), (2, 2.5), (3, 9.0), (4, 1.25)]


def test_only_the_logging_rank_writes(tmp_path):
    reporter = Reporter(tmp_path, config(), rank=1, world_size=2, stream=io.StringIO())
    reporter.log(step_metrics(1), expert_loads=LOADS)
    reporter.close()
    assert list(tmp_path.iterdir()) == []


# -- console --------------------------------------------------------------------
def test_plain_status_line_every_log_interval(tmp_path):
    out = io.StringIO()
    reporter = Reporter(tmp_path, config("logging.log_interval=2"), stream=out)
    for step in (1, 2, 3):
        reporter.log(step_metrics(step))
    reporter.log(step_metrics(4, mfu=None, loss=math.nan, lm_loss=None, mtp_loss=0.75, skipped=True))
    reporter.close()
    # The LM loss (what the README quotes), and the MTP loss apart when the model has MTP.
    assert out.getvalue().splitlines() == [
        # mean step time 1.5 s × 2 steps left
        "step 2/4 | lm loss 2.0000 | lr 1.000e-03 | 4096 tokens/s | MFU 6.1% | ETA 0:00:03",
        "step 4/4 | lm loss nan, mtp loss 0.7500 | lr 1.000e-03 | 4096 tokens/s | MFU n/a | ETA 0:00:00 "
        "| skipped (non-finite)",
    ]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_replaces_the_status_line(tmp_path):
    out = FakeTerminal()
    reporter = Reporter(tmp_path, config("logging.progress=true"), stream=out)
    for step in (1, 2, 3, 4):
        reporter.log(step_metrics(step))
    reporter.close()
    text = out.getvalue()
    assert "4/4" in text and "lm loss 1.0000" in text
    assert "step 4/4 |" not in text


# -- wandb and TensorBoard ------------------------------------------------------------
def test_disabled_wandb_is_never_imported(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb now fails
    Reporter(tmp_path / "a", config()).close()
    Reporter(tmp_path / "b", config("logging.wandb=true", "logging.wandb_mode=disabled")).close()
    with pytest.raises(ImportError, match="pip install wandb"):
        Reporter(tmp_path / "c", config("logging.wandb=true", "logging.wandb_mode=offline"))


def test_missing_tensorboard_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        Reporter(tmp_path, config("logging.tensorboard=true"))


def wandb_records(path: Path):
    """Records of a .wandb file: a 7-byte header, then 32 KiB blocks of records
    (4-byte checksum, 2-byte length, 1-byte type: 1 whole, 2 first, 3 middle,
    4 last piece), each a serialised ``Record`` protobuf."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_file: Path) -> dict[int, dict]:
    history = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            history[record.history.step.num] = items
    return history


def test_wandb_offline_run_holds_the_logged_history(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config("logging.wandb=true", "logging.wandb_mode=offline")
    reporter = Reporter(tmp_path, cfg, heatmap_interval=2, stream=io.StringIO())
    for step in (1, 2, 3):
        reporter.log(step_metrics(step), expert_loads=LOADS)
    reporter.close()

    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    history = wandb_history(run_dir / f"run-{run_id}.wandb")
    assert sorted(history) == [1, 2, 3]
    assert [history[s]["loss"] for s in (1, 2, 3)] == pytest.approx([5.0, 2.5, 5.0 / 3])
    assert history[2]["mfu"] == pytest.approx(0.06144)
    assert history[1]["expert_load_imbalance/layers.2.mlp"] == pytest.approx(4.0)
    # The heatmap went to step 2 only, as an image file in the run.
    assert history[2]["expert_load/_type"] == "image-file"
    assert "expert_load/_type" not in history[1] and "expert_load/_type" not in history[3]
    assert (run_dir / "files" / history[2]["expert_load/path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The resolved config is the run's config.
    config_items = {item.key: json.loads(item.value_json) for r in wandb_records(run_dir / f"run-{run_id}.wandb")
                    if r.WhichOneof("record_type") == "run" for item in r.run.config.update}
    assert config_items["train"]["steps"] == 4 and config_items["world_size"] == 1

    # A resumed run continues the same wandb run id.
    Reporter(tmp_path, cfg, start_step=3, stream=io.StringIO()).close()
    # (a second directory in the same second gets a "-1" suffix)
    assert f"-{run_id}" in (tmp_path / "wandb" / "latest-run").resolve().name


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reporter = Reporter(tmp_path, config("logging.tensorboard=true"), heatmap_interval=2, stream=io.StringIO())
    for step in (1, 2, 3):
        reporter.log(step_metrics(step), expert_loads=LOADS)
    reporter.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == [1, 2, 3]
    assert [e.value for e in scalars] == pytest.approx([5.0, 2.5, 5.0 / 3])
    assert [e.step for e in events.Images("expert_load")] == [2]


# -- heatmap ------------------------------------------------------------------------
def test_heatmap_png_written_at_close(tmp_path):
    reporter = Reporter(tmp_path, config(), stream=io.StringIO())
    reporter.log(step_metrics(1), expert_loads=LOADS)
    reporter.log(step_metrics(2), expert_loads=torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 4.0]]))
    reporter.close()
    png = tmp_path / "expert_load_step_000002.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert not (tmp_path / "expert_load_step_000001.png").exists()


def test_heatmap_colours_follow_the_normalised_load():
    balanced = render_expert_load(["a"], torch.tensor([[2.0, 2.0]]), 1)
    skewed = render_expert_load(["a"], torch.tensor([[0.0, 4.0]]), 1)
    assert balanced.shape == skewed.shape and balanced.shape[2] == 3
    # Same axes and labels; only the cells differ.
    assert (balanced != skewed).any()
    assert not (render_expert_load(["a"], torch.tensor([[3.0, 3.0]]), 1) != balanced).any()
