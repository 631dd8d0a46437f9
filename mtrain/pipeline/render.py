"""PNG timeline of a pipeline schedule.

Input is a plain list, one entry per rank, of ``(instruction, start, end)``
tuples (what ``simulate`` produces in ``SimResult.timelines``; a runtime can
feed measured timelines in the same shape). One row per rank; blocks coloured
by kind (F / B / I / W), a darker shade for DualPipe's direction 1, an
overlapped F&B pair drawn as a split block (forward on top, backward below),
each block labelled with its micro-batch; idle time shows as the grey row
background.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from mtrain.pipeline.instructions import Op, Overlap  # noqa: E402

# (direction 0, direction 1) colours per kind
COLORS = {
    "F": ("#f6b26b", "#c27819"),
    "B": ("#6fbf73", "#2e7d32"),
    "I": ("#6fa8dc", "#1f5fa8"),
    "W": ("#c9a0dc", "#7b3f99"),
}
IDLE = "#e6e6e6"
OVERLAP_EDGE = "#b00020"


def _timelines(result) -> list[Sequence[tuple]]:
    if hasattr(result, "timelines"):
        return result.timelines
    return list(result)


def _shade(op: Op, pp: int) -> int:
    """Darker shade for DualPipe's direction 1 and for the returning leg of
    DualPipeV (stages pp..2pp-1, which exist only when there are more stages
    than ranks)."""
    return 1 if op.direction == 1 or op.stage >= pp else 0


def _block(ax, op: Op, x0: float, x1: float, y0: float, height: float, fontsize: float, pp: int,
           edge: str = "white", points_per_unit: float = float("inf")):
    shade = _shade(op, pp)
    color = COLORS[op.kind][shade]
    ax.add_patch(Rectangle((x0, y0), x1 - x0, height, facecolor=color, edgecolor=edge, linewidth=0.6))
    label = str(op.microbatch)
    if (x1 - x0) * points_per_unit < 0.65 * fontsize * (len(label) + 0.5):
        return  # too narrow for a legible label: the colour and the neighbours say enough
    text_color = "white" if shade else "black"
    ax.text((x0 + x1) / 2, y0 + height / 2, label, ha="center", va="center",
            fontsize=fontsize, color=text_color, clip_on=True)


def render_timeline(result, path: str, title: str | None = None) -> str:
    """Draw ``result`` (a ``SimResult`` or a list per rank of ``(op, start,
    end)``) to the PNG file ``path``; returns ``path``."""
    timelines = _timelines(result)
    pp = len(timelines)
    ends = [end for tl in timelines for _, _, end in tl]
    starts = [start for tl in timelines for _, start, _ in tl]
    t0 = min(starts, default=0.0)
    t1 = max(ends, default=1.0)
    span = max(t1 - t0, 1e-9)
    durations = [end - start for tl in timelines for _, start, end in tl if end > start]
    shortest = min(durations, default=span)

    # Wide enough for the shortest blocks up to a readable page (a measured step has
    # blocks of very different lengths: the narrow ones lose their labels instead of
    # the figure growing into an unreadable strip); tall enough for a legend and title.
    width = min(max(8.0, 16.0 * span / max(shortest, span / 120) / 60), 18.0)
    fig, ax = plt.subplots(figsize=(width, max(3.2, 0.8 * pp + 1.8)))
    inch_per_unit = (width * 0.85) / span
    points_per_unit = inch_per_unit * 72
    fontsize = max(7.0, min(9.0, shortest * points_per_unit / 2.2))
    height = 0.8
    has_dir1 = False
    has_v = False
    kinds_seen = set()
    overlap_seen = False
    for rank, tl in enumerate(timelines):
        y = pp - 1 - rank  # rank 0 on top
        ax.add_patch(Rectangle((t0, y - height / 2), span, height, facecolor=IDLE, edgecolor="none"))
        for ins, start, end in tl:
            if isinstance(ins, Overlap):
                overlap_seen = True
                _block(ax, ins.forward, start, end, y, height / 2, fontsize * 0.85, pp,
                       points_per_unit=points_per_unit)
                _block(ax, ins.backward, start, end, y - height / 2, height / 2, fontsize * 0.85, pp,
                       points_per_unit=points_per_unit)
                ax.add_patch(Rectangle((start, y - height / 2), end - start, height, facecolor="none",
                                       edgecolor=OVERLAP_EDGE, linewidth=1.0))
                ops = ins.ops
            else:
                _block(ax, ins, start, end, y - height / 2, height, fontsize, pp, points_per_unit=points_per_unit)
                ops = (ins,)
            for op in ops:
                kinds_seen.add(op.kind)
                has_dir1 |= op.direction == 1
                has_v |= op.stage >= pp

    ax.set_xlim(t0, t1)
    ax.set_ylim(-0.6, pp - 0.4)
    ax.set_yticks(range(pp))
    ax.set_yticklabels([f"rank {r}" for r in reversed(range(pp))])
    ax.set_xlabel("time")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="y", length=0)
    if title:
        ax.set_title(title)

    names = {"F": "forward", "B": "backward", "I": "backward (input)", "W": "backward (weight)"}
    handles = []
    for kind in "FBIW":
        if kind not in kinds_seen:
            continue
        if has_dir1:
            handles.append(Patch(facecolor=COLORS[kind][0], label=f"{names[kind]}, direction 0"))
            handles.append(Patch(facecolor=COLORS[kind][1], label=f"{names[kind]}, direction 1"))
        elif has_v:
            handles.append(Patch(facecolor=COLORS[kind][0], label=f"{names[kind]}, stages 0..{pp - 1}"))
            handles.append(Patch(facecolor=COLORS[kind][1], label=f"{names[kind]}, stages {pp}..{2 * pp - 1}"))
        else:
            handles.append(Patch(facecolor=COLORS[kind][0], label=names[kind]))
    if overlap_seen:
        handles.append(Patch(facecolor="white", edgecolor=OVERLAP_EDGE, label="overlapped F&B (F top, B bottom)"))
    handles.append(Patch(facecolor=IDLE, label="idle"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.5 / (0.55 * pp)),
              ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
