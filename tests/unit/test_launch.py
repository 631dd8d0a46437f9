"""Launcher side without a cluster: batch scripts and submitit parameters from
the config, the requeue decision (with a stand-in ``scontrol``), the job
announcer, the multi-node script and the Dockerfile (static checks)."""
from __future__ import annotations

import os
import pickle
import re
import shlex
import signal
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mtrain.launch import requeue
from mtrain.launch.announce import AnnounceSlurmJobs, JobAnnouncer
from mtrain.launch.sbatch import compose_with_launcher, main as sbatch_main, render_script, sbatch_options, script_for
from mtrain.parallel import groups as groups_module
from mtrain.parallel.groups import collective_device
from mtrain.testing import run_distributed

ROOT = Path(__file__).resolve().parents[2]
GPU_JOB = ["cluster.nodes=4", "cluster.gpus_per_node=8", "hydra.launcher.partition=gpu",
           "hydra.launcher.account=proj", "hydra.launcher.qos=high", "hydra.launcher.constraint=h100",
           "hydra.launcher.exclusive=true", "hydra.launcher.mail_user=me@example.org",
           "hydra.launcher.mail_type='END,FAIL'", "hydra.launcher.timeout_min=720", "hydra.launcher.mem_gb=512",
           "+hydra.launcher.additional_parameters.reservation=big"]


def launcher_params(overrides):
    return OmegaConf.to_container(compose_with_launcher(overrides).hydra.launcher, resolve=True)


# -- sbatch options and scripts ----------------------------------------------

def test_sbatch_options_follow_cluster_and_launcher_config():
    options = sbatch_options(launcher_params(GPU_JOB))
    assert options == {
        "job-name": "mtrain", "nodes": 4, "ntasks-per-node": 8, "gpus-per-node": 8, "time": 720,
        "partition": "gpu", "account": "proj", "qos": "high", "constraint": "h100", "exclusive": True,
        "mail-user": "me@example.org", "mail-type": "END,FAIL", "mem": "512G",
        "signal": "USR1@300", "requeue": True, "reservation": "big",
    }


def test_signal_delay_moves_the_warning_and_unset_options_are_left_out():
    options = sbatch_options(launcher_params(["hydra.launcher.signal_delay_s=90", "hydra.launcher.gpus_per_node=null"]))
    assert options["signal"] == "USR1@90"
    assert "gpus-per-node" not in options and "partition" not in options and "exclusive" not in options
    assert (options["nodes"], options["ntasks-per-node"]) == (1, 4)  # cluster=local


def test_script_runs_one_task_per_rank_with_the_training_overrides(tmp_path):
    text = script_for(GPU_JOB + ["parallel.pp=4", "run_dir=runs/lr${train.lr}"], tmp_path / "logs")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for option in ("--nodes=4", "--ntasks-per-node=8", "--signal=USR1@300", "--requeue", "--partition=gpu",
                   "--exclusive", "--open-mode=append", f"--output={tmp_path / 'logs'}/%x-%j.out"):
        assert f"#SBATCH {option}" in lines, option
    srun = next(line for line in lines if line.startswith("srun "))
    argv = shlex.split(srun)
    train_args = argv[argv.index("mtrain.cli.train") + 1:]
    # Hydra's own overrides configure the launcher, not the trainer; an
    # interpolation stays as typed and resolves in the job.
    assert train_args == ["cluster.nodes=4", "cluster.gpus_per_node=8", "parallel.pp=4", "run_dir=runs/lr${train.lr}"]
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_sbatch_rejects_a_bad_choice_before_writing(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        sbatch_main(["parallel.schedule=gpipe", "--out", str(tmp_path / "job.sbatch"), "--log-dir", str(tmp_path)])
    assert info.value.code == 2
    assert "parallel.schedule='gpipe' is not a valid choice; choose one of 1f1b, zb1p, dualpipe, dualpipev" \
        in capsys.readouterr().err
    assert not (tmp_path / "job.sbatch").exists()


def test_render_script_quotes_values_and_keeps_setup_lines(tmp_path):
    text = render_script({"job-name": "a b", "requeue": True}, ["x=1"], tmp_path, setup=["module load cuda"],
                         python="/opt/py/bin/python")
    assert "#SBATCH --job-name='a b'" in text and "#SBATCH --requeue" in text
    assert text.index("module load cuda") < text.index("srun ")
    assert "srun --kill-on-bad-exit=1 /opt/py/bin/python -u -m mtrain.cli.train x=1" in text


def test_submitit_writes_the_same_resources_signal_and_requeue(tmp_path):
    """The params as hydra-submitit-launcher hands them to submitit (base
    keys as they are, the rest prefixed with the executor name)."""
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = launcher_params(GPU_JOB)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params.pop("_target_")
    init_keys = {"submitit_folder", "max_num_timeout"}
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items() if k not in init_keys})
    text = executor._executor._make_submission_file_text("python -m x", "uid")
    for option in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=USR1@300", "--requeue",
                   "--partition=gpu", "--account=proj", "--exclusive", "--mail-type=END,FAIL", "--time=720"):
        assert f"#SBATCH {option}" in text.splitlines(), option
    assert "USR2" not in text  # submitit's own warning signal is replaced


# -- requeue -------------------------------------------------------------------

def test_job_id_for_plain_and_array_jobs():
    assert requeue.slurm_job_id({"SLURM_JOB_ID": "42"}) == "42"
    assert requeue.slurm_job_id({"SLURM_JOB_ID": "43", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3"}) == "40_3"
    assert requeue.slurm_job_id({}) is None


@pytest.mark.parametrize("signum, environ, wanted", [
    (signal.SIGUSR1, {"SLURM_JOB_ID": "42"}, True),
    (signal.SIGTERM, {"SLURM_JOB_ID": "42"}, False),  # scancel: stop for good
    (None, {"SLURM_JOB_ID": "42"}, False),            # exit_interval stop
    (signal.SIGUSR1, {}, False),                      # not a Slurm job (torchrun)
    (signal.SIGUSR1, {"SLURM_JOB_ID": "42", "MTRAIN_REQUEUE": "0"}, False),
])
def test_requeue_only_on_the_warning_inside_slurm(signum, environ, wanted):
    assert requeue.requeue_wanted(signum, environ) is wanted


def fake_scontrol(folder: Path, exit_code: int = 0) -> Path:
    """An ``scontrol`` that records its arguments in ``calls``."""
    calls = folder / "calls"
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit {exit_code}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return calls


def test_requeue_runs_scontrol_and_leaves_without_a_result(tmp_path, monkeypatch):
    calls = fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SystemExit) as exit_info:
        requeue.requeue_if_warned(signal.SIGUSR1, {"SLURM_JOB_ID": "42"})
    assert exit_info.value.code == 0
    assert calls.read_text().split() == ["requeue", "42"]


def test_stop_signal_without_requeue_returns(tmp_path, monkeypatch):
    calls = fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    requeue.requeue_if_warned(signal.SIGTERM, {"SLURM_JOB_ID": "42"})
    assert not calls.exists()


def test_failed_requeue_returns_so_the_run_ends_normally(tmp_path, monkeypatch):
    calls = fake_scontrol(tmp_path, exit_code=1)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    requeue.requeue_if_warned(signal.SIGUSR1, {"SLURM_JOB_ID": "42"})
    assert calls.read_text().split() == ["requeue", "42"]


def _rank_requeue(signals, environ):
    import torch.distributed as dist

    try:
        requeue.requeue_if_warned(signals[dist.get_rank()], environ)
    except SystemExit as e:
        return f"exit {e.code}"
    return "returned"


@pytest.mark.parametrize("signals, outcome, calls_expected", [
    ([None, signal.SIGUSR1], "exit 0", 1),             # only rank 1 saw the warning: rank 0 requeues
    ([signal.SIGUSR1, signal.SIGTERM], "returned", 0),  # a stop for good on any rank wins
])
def test_ranks_agree_and_only_rank0_requeues(tmp_path, monkeypatch, signals, outcome, calls_expected):
    calls = fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    results = run_distributed(_rank_requeue, 2, signals, {"SLURM_JOB_ID": "7"}, timeout=60)
    assert results == [outcome, outcome]
    assert (calls.read_text().splitlines() if calls.exists() else []) == ["requeue 7"] * calls_expected


def _collective_device_of_world():
    return str(collective_device())


def test_collective_device_is_the_cpu_under_gloo():
    assert run_distributed(_collective_device_of_world, 2, timeout=60) == ["cpu", "cpu"]


def test_collective_device_is_the_current_cuda_device_under_nccl(monkeypatch):
    monkeypatch.setattr(groups_module.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(groups_module.torch.cuda, "current_device", lambda: 3)
    assert collective_device() == torch.device("cuda", 3)


class _Collective(Exception):
    """Raised by a stand-in collective, carrying the device of its tensor."""


def _stand_in_collective(tensor, *args, **kwargs):
    raise _Collective(tensor.device)


def test_requeue_collectives_put_their_tensors_on_the_collective_device(monkeypatch):
    # NCCL refuses CPU tensors: both collectives must ask where their tensor goes.
    monkeypatch.setattr(requeue, "collective_device", lambda group=None: torch.device("meta"))
    monkeypatch.setattr(requeue.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(requeue.dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(requeue.dist, "all_reduce", _stand_in_collective)
    monkeypatch.setattr(requeue.dist, "broadcast", _stand_in_collective)
    with pytest.raises(_Collective) as reduce_info:
        requeue.agreed_stop_signal(signal.SIGUSR1)
    monkeypatch.setattr(requeue, "agreed_stop_signal", lambda signum: signum)
    with pytest.raises(_Collective) as broadcast_info:
        requeue.requeue_if_warned(signal.SIGUSR1, {"SLURM_JOB_ID": "42"})
    assert reduce_info.value.args[0] == broadcast_info.value.args[0] == torch.device("meta")


# -- announcing submitted jobs ------------------------------------------------------

def test_announcer_prints_each_job_once_with_its_logs(tmp_path):
    root = tmp_path / ".submitit"
    lines: list[str] = []
    announcer = JobAnnouncer(root, emit=lines.append)
    announcer.announce_new()
    assert lines == []
    (root / "7").mkdir(parents=True)
    (root / "7" / "7_submitted.pkl").touch()
    (root / "7" / "7_submission.sh").touch()
    (root / "8").mkdir()  # a sweep: array 8, element 8_0
    (root / "8" / "8_submission.sh").touch()
    (root / "8_0").mkdir()
    (root / "8_0" / "8_0_submitted.pkl").touch()
    announcer.announce_new()
    announcer.announce_new()
    assert lines == [
        f"submitted Slurm job 7: rank 0 log {root}/7/7_0_log.out (rank N: 7_N_log.out), batch script {root}/7/7_submission.sh",
        f"submitted Slurm job 8_0: rank 0 log {root}/8_0/8_0_0_log.out (rank N: 8_0_N_log.out), "
        f"batch script {root}/8/8_submission.sh",
    ]


def test_callback_pickles_without_its_watcher(tmp_path, capsys):
    callback = AnnounceSlurmJobs()
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)},
                                      "launcher": {"submitit_folder": f"{tmp_path}/.submitit/%j"}}})
    callback.on_multirun_start(cfg)
    try:
        assert callback.announcer.submitit_dir == tmp_path / ".submitit"
        assert pickle.loads(pickle.dumps(callback)).announcer is None
    finally:
        callback.on_multirun_end(cfg)


# -- scripts and Dockerfile ----------------------------------------------------------

@pytest.mark.parametrize("script", ["scripts/run_multinode.sh", "scripts/slurm/train.sbatch"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_train_sbatch_asks_for_the_warning_and_requeue():
    text = (ROOT / "scripts/slurm/train.sbatch").read_text()
    assert re.search(r"^#SBATCH --signal=USR1@\d+$", text, re.M)
    assert "#SBATCH --requeue" in text and "#SBATCH --open-mode=append" in text
    assert re.search(r'^srun .*-m mtrain\.cli\.train "\$@"$', text, re.M)
    for variable in ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_DEBUG"):
        assert variable in text


def run_multinode_argv(**env) -> list[str]:
    """The torchrun command line the script would exec (PYTHON=echo prints it)."""
    out = subprocess.run(["bash", str(ROOT / "scripts/run_multinode.sh"), "parallel.pp=2"],
                         env={"PATH": os.environ["PATH"], "PYTHON": "echo", **env},
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def test_run_multinode_builds_a_c10d_rendezvous():
    argv = run_multinode_argv(NNODES="2", NPROC_PER_NODE="4", RDZV_ENDPOINT="node0:29400")
    assert argv[:2] == ["-m", "torch.distributed.run"]
    assert argv[-3:] == ["-m", "mtrain.cli.train", "parallel.pp=2"]
    pairs = dict(zip(argv[2:-3:2], argv[3:-3:2]))
    assert pairs == {"--nnodes": "2", "--nproc-per-node": "4", "--rdzv-backend": "c10d",
                     "--rdzv-endpoint": "node0:29400", "--rdzv-id": "mtrain", "--max-restarts": "0"}
    assert "--node-rank" in run_multinode_argv(NODE_RANK="1")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)
    out = []
    for line in logical.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word, rest))
    return out


def test_dockerfile_installs_te_deepep_on_nvshmem_and_mtrain():
    instructions = dockerfile_instructions()
    known = {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "CMD"}
    assert {word for word, _ in instructions} <= known
    words = [word for word, _ in instructions]
    first_from = words.index("FROM")
    assert all(word == "ARG" for word in words[:first_from])  # only build args before FROM
    base = dict(rest.split("=", 1) for word, rest in instructions[:first_from])
    assert instructions[first_from][1] == "${BASE_IMAGE}" and "pytorch" in base["BASE_IMAGE"]
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "transformer-engine[pytorch]" in runs
    assert "nvidia-nvshmem" in runs
    deepep = next(rest for word, rest in instructions if word == "RUN" and "DeepEP" in rest)
    assert "NVSHMEM_DIR=" in deepep and "pip install" in deepep and "import deep_ep" in deepep
    assert runs.index("nvidia-nvshmem") < runs.index("DeepEP")
    assert any(word == "COPY" for word in words)
    assert re.search(r"pip install [^&]*-e \"\.\[gpu,slurm\]\"", runs)


def test_dockerignore_keeps_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)
