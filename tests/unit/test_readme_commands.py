"""Every command in the README's code blocks is valid as written: the configs
the training, evaluation and planning commands compose pass the full config
check at their world size (a typo in an override, a renamed field or a rule
the example breaks fails here, not on a user's first try), and the schedule
and sbatch commands run. (The long-running commands themselves are run by
the tests of what they do; the two Quickstart commands by CI and the e2e
training tests.)"""
import re
import shlex
from pathlib import Path

import pytest

from mtrain.planner.plan import make_plan
from mtrain.config.loading import load_config
from mtrain.train.preflight import config_errors

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> list[list[str]]:
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line.split("&&")[-1]))
    return commands


def overrides_after(words: list[str], marker: str) -> list[str]:
    rest = words[words.index(marker) + 1:]
    return [w for w in rest if "=" in w and not w.startswith(("-", "hydra"))]


def by_program(program: str) -> list[list[str]]:
    return [c for c in readme_commands() if c[0] == program]


def test_the_readme_has_the_commands_this_checks():
    programs = {c[0] for c in readme_commands()}
    assert {"torchrun", "mtrain-eval", "mtrain-plan", "mtrain-schedule", "mtrain-sbatch"} <= programs


@pytest.mark.parametrize("words", by_program("torchrun"), ids=lambda w: " ".join(w[5:]) or "default")
def test_training_commands_compose_valid_configs(words):
    world = int(words[words.index("--nproc-per-node") + 1])
    cfg = load_config(overrides_after(words, "mtrain.cli.train"))
    assert config_errors(cfg, world) == []


@pytest.mark.parametrize("words", by_program("mtrain-eval") + by_program("mtrain-train"), ids=lambda w: w[0])
def test_other_launch_commands_compose_valid_configs(words):
    cfg = load_config(overrides_after(words, words[0]))
    world = 1 if words[0] == "mtrain-eval" else None
    # The checkpoint an evaluation names exists once the README's training run has made it.
    errors = [e for e in config_errors(cfg, world) if not e.startswith("checkpoint.resume=")]
    assert errors == []


@pytest.mark.parametrize("words", by_program("mtrain-plan"), ids=lambda w: " ".join(w[1:3]))
def test_plan_commands_give_plans_without_errors(words):
    assert make_plan(load_config(overrides_after(words, "mtrain-plan")))["errors"] == []


@pytest.mark.parametrize("words", by_program("mtrain-schedule") + by_program("mtrain-sbatch"), ids=lambda w: w[0])
def test_schedule_and_sbatch_commands_run(words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if words[0] == "mtrain-schedule":
        from mtrain.cli.schedule import main

        assert main(words[1:]) == 0
    else:
        from mtrain.launch.sbatch import main

        main(words[1:])
    written = [w for w in words if w.endswith((".png", ".sbatch"))]
    assert all((tmp_path / w).is_file() for w in written)
