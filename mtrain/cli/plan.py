"""``mtrain-plan``: print the plan of a config without training and, with a
GPU profile (``cluster=h800|h100|h200``), the step it predicts; ``--search``
ranks every layout that fits (docs/planning.md).

    mtrain-plan parallel.pp=4 parallel.schedule=dualpipev output=json
    mtrain-plan model=deepseek_v3 cluster=h800 cluster.nodes=256 parallel.pp=16 parallel.ep=64
    mtrain-plan --search model=deepseek_v3 cluster=h800 cluster.nodes=256

Exit status 2 when the config is invalid (a bad choice such as
``parallel.schedule=gpipe`` is reported on stderr even with ``output=json``).
"""
from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig

from mtrain.config.loading import run_app
from mtrain.cli.planning import format_balanced, format_calibration, format_plan, format_prediction, format_search
from mtrain.pipeline.schedule_rules import num_model_stages
from mtrain.planner.hardware import profile_errors
from mtrain.planner.plan import make_plan


def _calibration(cfg: DictConfig, plan: dict):
    """(comparison with the trace's own step, measured costs) for ``plan.calibrate``."""
    from mtrain.planner.calibrate import compare

    p = cfg.parallel
    result = compare(cfg.plan.calibrate, str(p.schedule), p.pp, plan["num_microbatches"],
                     num_model_stages(str(p.schedule), p.pp))
    return result, result["costs"]


def _search(cfg: DictConfig) -> None:
    from mtrain.planner.search import search, stderr_progress

    errors = profile_errors(cfg.cluster)
    if errors:
        print("invalid config:\n" + "\n".join(f"  - {e}" for e in errors), file=sys.stderr)
        sys.exit(2)
    try:
        result = search(cfg, stderr_progress)
    except ValueError as e:
        print(f"invalid config:\n  - {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.output == "json":
        result["ranked"] = result["ranked"][:cfg.plan.top]
        print(json.dumps(result))
    else:
        print(format_search(result, cfg.plan.top))


@hydra.main(config_path="pkg://mtrain.configs", config_name="plan", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    if cfg.plan.search:
        return _search(cfg)
    plan = make_plan(cfg)
    if plan["errors"]:
        print(json.dumps(plan) if cfg.output == "json" else format_plan(plan),
              file=sys.stdout if cfg.output == "json" else sys.stderr)
        sys.exit(2)
    lines = [format_plan(plan)]
    calibration = None
    if cfg.plan.calibrate:
        comparison, calibration = _calibration(cfg, plan)
        plan["calibration"] = {k: v for k, v in comparison.items() if k != "costs"}
        lines.append(format_calibration(comparison))
    if not profile_errors(cfg.cluster):
        from mtrain.planner.predict import predict

        prediction = predict(cfg, calibration, plan)
        sim = prediction.pop("simulation")
        plan["prediction"] = prediction
        lines += format_prediction(prediction, cfg.cluster.efficiency)
        if calibration is None and cfg.parallel.pipeline_layout is None:
            from mtrain.planner.balance import balanced_prediction

            balanced = balanced_prediction(cfg)
            if balanced is not None:
                balanced.pop("simulation")
                plan["balanced"] = balanced
                lines.append(format_balanced(balanced, prediction))
        if cfg.plan.png:
            from mtrain.pipeline.render import render_timeline

            render_timeline(sim, cfg.plan.png, f"{plan['schedule']} pp={cfg.parallel.pp} on {prediction['world_size']} "
                            f"x {prediction['hardware']}: predicted step {prediction['step_s']:.3g} s")
            lines.append(f"wrote {cfg.plan.png}")
    print(json.dumps(plan) if cfg.output == "json" else "\n".join(lines))


def main() -> None:
    # ``--search`` reads better than plan.search=true on a command line.
    sys.argv = [("plan.search=true" if a == "--search" else a) for a in sys.argv]
    run_app(_app)


if __name__ == "__main__":
    main()
