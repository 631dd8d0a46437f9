"""Text form of a run's plan (:func:`mtrain.planner.plan.make_plan`) for ``mtrain-plan``."""
from __future__ import annotations

def _fmt_ranks(ranks: list[int], limit: int = 16) -> str:
    if len(ranks) <= limit:
        return str(ranks)
    return f"[{', '.join(map(str, ranks[:limit // 2]))}, ..., {ranks[-1]}] ({len(ranks)} ranks)"


def _fmt_groups(groups: list[list[int]], limit: int = 8) -> str:
    shown = ", ".join(_fmt_ranks(g) for g in groups[:limit])
    return shown + (f", ... ({len(groups)} groups)" if len(groups) > limit else "")


def format_plan(plan: dict) -> str:
    if plan["errors"]:
        return "invalid config:\n" + "\n".join(f"  - {e}" for e in plan["errors"])
    lines = [
        f"world size {plan['world_size']}: tp={plan['tp']} pp={plan['pp']} dp={plan['dp']} | "
        f"experts: ep={plan['ep']} expert_tp={plan['expert_tp']} expert_dp={plan['expert_dp']} "
        f"(order {plan['order']})",
        f"schedule {plan['schedule']}: {plan['num_microbatches']} micro-batches, "
        f"{plan['num_stages']} model stages, {plan['param_copies']} copy(ies) of each stage",
        f"global batch {plan['global_batch_size']} sequences = {plan['tokens_per_step']} tokens per step",
        *_format_ramp(plan["batch_ramp"], plan["global_batch_size"]),
        "groups:",
    ]
    lines += [f"  {kind:<14} {_fmt_groups(groups)}" for kind, groups in plan["groups"].items()]
    lines.append("pipeline:")
    for entry in plan["pipeline_ranks"]:
        lines.append(
            f"  pp rank {entry['pp_rank']}: stages {entry['stages']} on ranks {_fmt_groups([entry['ranks']])}"
        )
    lines += _format_model(plan)
    return "\n".join(lines)


def _format_ramp(ramp, global_batch: int) -> list[str]:
    if ramp is None:
        return []
    return [f"batch ramp: {ramp['start_size']} -> {global_batch} sequences by {ramp['increment']} over the first "
            f"{ramp['ramp_samples']} samples ({ramp['sizes']} sizes; full batch from step {ramp['steps'] + 1}, "
            f"after {ramp['samples']} samples)"]


def _count(n: float) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def _flops(n: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}FLOP"
    return f"{n:.3g} FLOP"


def _bytes(n: float) -> str:
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 2**shift:
            return f"{n / 2**shift:.2f} {unit}"
    return f"{int(n)} B"


def _layer_range(layers: list[int]) -> str:
    if not layers:
        return "no layers"
    return f"layers {layers[0]}-{layers[-1]} ({len(layers)})"


def _format_model(plan: dict) -> list[str]:
    lines = [
        f"model {plan['model']}: {_count(plan['params_total'])} total, "
        f"{_count(plan['params_activated'])} activated, MTP {_count(plan['params_mtp'])}; "
        f"{_flops(plan['flops_per_token'])} per token for training at seq_len {plan['seq_len']}",
        "stages:",
    ]
    for s in plan["stages"]:
        extras = [name for name in ("embedding", "head", "mtp") if s[name]]
        lines.append(
            f"  stage {s['stage']}: {_layer_range(s['layers'])}"
            + (f" + {' + '.join(extras)}" if extras else "")
            + f" on pp ranks {s['pp_ranks']}"
        )
    lines.append(f"memory per rank (estimate, {plan['dtype']} training):")
    for r in plan["memory"]:
        lines.append(
            f"  pp rank {r['pp_rank']}: {_count(r['params'])} params; weights {_bytes(r['weights'])} + "
            + (f"their FP8 copy {_bytes(r['fp8_weights'])} + " if r["fp8_weights"] else "")
            + f"grads {_bytes(r['grads'])} + optimizer {_bytes(r['optimizer'])} + activations "
            f"{_bytes(r['activations'])} ({r['peak_inflight_microbatches']} micro-batches in flight) "
            f"= {_bytes(r['total'])}"
        )
    return lines


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def format_prediction(pred: dict, efficiency) -> list[str]:
    """The predicted step (:func:`mtrain.planner.predict.predict`) as text."""
    lay, parts = pred["layout"], pred["busiest_rank"]
    source = "measured op costs (plan.calibrate)" if pred["calibrated"] else (
        f"roofline estimates at efficiency gemm {efficiency.gemm}, fp8 {efficiency.fp8_gemm}, attention "
        f"{efficiency.attention}, memory {efficiency.memory}, network {efficiency.network}")
    lines = [
        f"predicted step on {pred['world_size']} x {pred['hardware']} ({pred['nodes']} nodes; {source}):",
        f"  step {pred['step_s']:.3g} s = pipeline {pred['pipeline_s']:.3g} s (bubble {_pct(pred['bubble_ratio'])}, "
        f"{lay['num_microbatches']} micro-batches) + gradient sync {pred['grad_sync_s']:.3g} s + optimizer "
        f"{pred['optimizer_s']:.3g} s",
        f"  {pred['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, {pred['tflops_per_gpu']:.0f} TFLOP/s per GPU, "
        f"MFU {_pct(pred['mfu'])}; {pred['gpu_hours_per_trillion_tokens']:,.0f} GPU-hours per trillion tokens",
        f"  busiest pp rank {parts['rank']}: compute {parts['compute']:.3g} s, exposed all-to-all "
        f"{parts['exchange']:.3g} s, idle {parts['idle']:.3g} s; bound by {pred['bound']}",
    ]
    t = pred["traffic"]
    if t:
        lines.append(
            f"  all-to-all per token: {t['remote_nodes_per_token']:.2f} other nodes (EP over {t['nodes_spanned']}, "
            f"at most {t['node_limit']} per token), {t['remote_gpus_per_token']:.2f} other GPUs; "
            f"{t['ib_sends_per_token']:.2f} InfiniBand + {t['nvlink_sends_per_token']:.2f} NVLink sends of "
            f"{t['dispatch_bytes_per_send']:,.0f} B (dispatch) / {t['combine_bytes_per_send']:,.0f} B (combine); "
            f"backward {t['backward_bytes_per_send']:,.0f} B (output gradient) / "
            f"{t['combine_bytes_per_send']:,.0f} B (input gradient)")
    lines.append("  op costs per micro-batch (ms): stage F (all-to-all) | B (all-to-all) | W")
    for i, c in enumerate(pred["stage_costs"]):
        lines.append(f"    stage {i}: {1e3 * c['F']:.3g} ({1e3 * c['F_comm']:.3g}) | {1e3 * c['B']:.3g} "
                     f"({1e3 * c['B_comm']:.3g}) | {1e3 * c['W']:.3g}")
    worst = max(pred["memory"], key=lambda r: r["bytes"])
    lines.append(f"  memory: largest pp rank {worst['pp_rank']} needs {_bytes(worst['bytes'])} of "
                 f"{_bytes(pred['hbm_bytes'])} usable: " + ("fits" if pred["fits"] else
                 "does NOT fit (try model.recompute, more pp or ep, or mtrain-plan --search)"))
    return lines


def layer_counts(layout) -> str:
    """Layers per stage, repeats folded: ``5 4x14 0``; ``even`` for the default split."""
    if layout is None:
        return "even"
    runs = []
    for n in layout:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return " ".join(f"{n}x{k}" if k > 1 else str(n) for n, k in runs)


def format_balanced(balanced: dict, current: dict) -> str:
    """One line: the cost-balanced layout's prediction against ``current``'s."""
    change = balanced["gpu_hours_per_trillion_tokens"] / current["gpu_hours_per_trillion_tokens"] - 1
    fits = "" if balanced["fits"] else "; memory does NOT fit"
    return (f"  balanced by cost: parallel.pipeline_layout={balanced['layout']['pipeline_layout']} "
            f"({layer_counts(balanced['layout']['pipeline_layout'])}): step {balanced['step_s']:.3g} s, bubble "
            f"{_pct(balanced['bubble_ratio'])}, {balanced['gpu_hours_per_trillion_tokens']:,.0f} GPU-hours per "
            f"trillion tokens ({100 * change:+.1f} %){fits}")


def format_search(result: dict, top: int) -> str:
    """A table of the best layouts, then what bounds each of the first few."""
    ranked = result["ranked"]
    head = (f"{result['considered']} layouts on {result['world_size']} x {result['hardware']}: "
            f"{result['refused']} refused by the config checks, {result['too_big']} do not fit in memory, "
            f"{len(ranked)} ranked by predicted tokens/s per GPU")
    if not ranked:
        return head + "\nno layout fits: try more nodes, model.recompute=full, or a smaller micro_batch_size"
    headers = ["#", "tp", "pp", "ep", "dp", "schedule", "micro-batches", "layers/stage", "recompute", "fp8",
               "tokens/s/GPU", "MFU", "GPU-h per 1T tokens", "step s", "bubble", "peak memory", "bound"]
    rows = []
    for i, r in enumerate(ranked[:top], 1):
        lay = r["layout"]
        rows.append([str(i), str(lay["tp"]), str(lay["pp"]), str(lay["ep"]), str(lay["dp"]), lay["schedule"],
                     str(lay["num_microbatches"]), layer_counts(lay.get("pipeline_layout")), lay["recompute"],
                     lay["fp8"], f"{r['tokens_per_s_per_gpu']:,.0f}",
                     _pct(r["mfu"]), f"{r['gpu_hours_per_trillion_tokens']:,.0f}", f"{r['step_s']:.3g}",
                     _pct(r["bubble_ratio"]), _bytes(max(m["bytes"] for m in r["memory"])), r["bound"]])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    fmt = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    lines = [head, fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)]
    for i, r in enumerate(ranked[:min(top, 3)], 1):
        p, step = r["busiest_rank"], r["step_s"]
        lines.append(f"{i}. bound by {r['bound']}: busiest pp rank {p['rank']} spends {_pct(p['compute'] / step)} "
                     f"computing, {_pct(p['exchange'] / step)} on exposed all-to-all, {_pct(p['idle'] / step)} idle, "
                     f"{_pct(p['grad_sync'] / step)} on gradient sync and optimizer; memory "
                     f"{_bytes(max(m['bytes'] for m in r['memory']))} of {_bytes(r['hbm_bytes'])}")
    return "\n".join(lines)


def format_calibration(result: dict) -> str:
    return (f"calibration: {result['schedule']} pp={result['pp']} {result['num_microbatches']} micro-batches: "
            f"measured pipeline {1e3 * result['measured_s']:.1f} ms, simulated with its measured op costs "
            f"{1e3 * result['predicted_s']:.1f} ms (ratio {result['ratio']:.3f})")
