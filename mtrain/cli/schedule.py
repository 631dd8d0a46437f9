"""``mtrain-schedule``: simulate, compare and render pipeline schedules.

Examples::

    mtrain-schedule --schedule dualpipe --pp 8 --microbatches 20 --cost F=1,B=2,W=1,FB=2.5
    mtrain-schedule --schedule dualpipe --pp 8 --microbatches 20 --png dualpipe.png
    mtrain-schedule --schedule zb1p --pp 4 --microbatches 8 --json
    mtrain-schedule --compare --pp 8 --microbatches 20 --cost F=1,B=2,W=1,FB=2.5
"""
from __future__ import annotations

import argparse
import json
import sys

from mtrain.pipeline.schedule_rules import SCHEDULE_NAMES, schedule_errors


def parse_costs(text: str) -> dict[str, float]:
    """``"F=1,B=2,W=1,FB=2.5"`` -> dict; ValueError on malformed input."""
    from mtrain.pipeline.simulate import normalize_costs

    costs: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip().upper()
        if not sep or not name:
            raise ValueError(f"malformed cost {part!r}: expected NAME=VALUE, e.g. F=1,B=2,W=1,FB=2.5")
        try:
            costs[name] = float(value)
        except ValueError:
            raise ValueError(f"malformed cost {part!r}: {value.strip()!r} is not a number") from None
    normalize_costs(costs)  # raises on unknown names / bad values
    return costs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtrain-schedule",
        description="Simulate a pipeline schedule's timeline (bubble, activation peak) "
                    "with per-op costs, compare schedules, and render a PNG timeline.",
    )
    p.add_argument("--schedule", default="dualpipe",
                   help=f"one of {', '.join(SCHEDULE_NAMES)} (default dualpipe)")
    p.add_argument("--pp", type=int, default=8, help="pipeline ranks (default 8)")
    p.add_argument("--microbatches", "-n", type=int, default=20, help="micro-batches per step (default 20)")
    p.add_argument("--cost", default="F=1,B=2,W=1,FB=2.5",
                   help="op costs NAME=VALUE,...: F forward, B full backward, W weight gradient "
                        "(I = B - W), FB an overlapped forward+backward pair; missing names "
                        "default to F=1, B=2, W=1, FB=F+B (default F=1,B=2,W=1,FB=2.5)")
    p.add_argument("--latency", type=float, default=0.0,
                   help="p2p latency added to every cross-rank dependency (default 0)")
    p.add_argument("--png", metavar="PATH", help="render the timeline to this PNG file")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (per-rank ops in execution order, idle, peaks)")
    p.add_argument("--compare", action="store_true",
                   help="table of every schedule on the same pp, micro-batches and costs")
    return p


def _cli_words(message: str) -> str:
    """Name the command-line flags instead of the config fields."""
    for field, flag in (("parallel.num_microbatches", "--microbatches"), ("parallel.schedule", "--schedule"),
                        ("parallel.pp", "--pp")):
        message = message.replace(field, flag)
    return message


def _fmt(x: float) -> str:
    return f"{x:g}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def _summary(result) -> str:
    head = (f"{result.schedule}: pp={result.pp} micro-batches={result.num_microbatches} "
            f"stages={result.num_stages} costs F={_fmt(result.costs['F'])} B={_fmt(result.costs['B'])} "
            f"W={_fmt(result.costs['W'])} I={_fmt(result.costs['I'])} FB={_fmt(result.costs['FB'])} "
            f"latency={_fmt(result.latency)}")
    rows = [[str(r.rank), _fmt(r.busy), _fmt(r.idle), str(r.peak_activations), str(r.param_copies),
             str(len(r.timeline))] for r in result.ranks]
    table = _table(["rank", "busy", "idle", "peak act", "param copies", "instructions"], rows)
    tail = (f"makespan {_fmt(result.makespan)}, bubble (largest rank idle) {_fmt(result.bubble)}, "
            f"bubble ratio {100 * result.bubble_ratio:.2f}% (total idle / (pp * makespan))")
    return "\n".join([head, table, tail])


def compare_table(pp: int, n: int, costs: dict, latency: float = 0.0) -> tuple[str, list[str]]:
    """Markdown table of every schedule, and notes on the skipped ones."""
    from mtrain.pipeline.simulate import simulate

    rows, notes = [], []
    for name in SCHEDULE_NAMES:
        errors = schedule_errors(name, pp, n)
        if errors:
            notes.append(f"skipped {name}: " + _cli_words("; ".join(errors)))
            continue
        r = simulate(name, pp, n, costs, latency)
        rows.append([name, _fmt(r.makespan), _fmt(r.bubble), f"{100 * r.bubble_ratio:.2f}",
                     str(r.peak_activations), str(r.num_stages), str(r.param_copies)])
    headers = ["schedule", "makespan", "bubble", "bubble %", "peak activations", "stages", "param copies"]
    return _table(headers, rows), notes


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        costs = parse_costs(args.cost)
    except ValueError as e:
        parser.error(f"--cost: {e}")
    if args.latency < 0:
        parser.error(f"--latency must not be negative (got {args.latency})")

    if args.compare:
        if args.pp < 1 or args.microbatches < 1:
            parser.error("--pp and --microbatches must be at least 1")
        table, notes = compare_table(args.pp, args.microbatches, costs, args.latency)
        if args.json:
            from mtrain.pipeline.simulate import simulate

            out = {}
            for name in SCHEDULE_NAMES:
                if not schedule_errors(name, args.pp, args.microbatches):
                    r = simulate(name, args.pp, args.microbatches, costs, args.latency)
                    out[name] = {k: v for k, v in r.to_json().items() if k != "ranks"}
            print(json.dumps({"compare": out, "notes": notes}))
        else:
            print(f"pp={args.pp} micro-batches={args.microbatches} costs {args.cost} latency={_fmt(args.latency)}")
            print(table)
            print("bubble: largest per-rank idle time; bubble %: total idle / (pp * makespan); "
                  "peak activations in stages' activations for one micro-batch (a dualpipev stage "
                  "is half a pp-stage, and its costs here are per stage as given)")
            for note in notes:
                print(note)
        return 0

    errors = schedule_errors(args.schedule, args.pp, args.microbatches)
    if errors:
        parser.error(_cli_words("; ".join(errors)))

    from mtrain.pipeline.simulate import simulate

    result = simulate(args.schedule, args.pp, args.microbatches, costs, args.latency)
    if args.png:
        from mtrain.pipeline.render import render_timeline

        render_timeline(result, args.png,
                        f"{args.schedule} pp={args.pp} micro-batches={args.microbatches} "
                        f"(bubble {_fmt(result.bubble)}, {100 * result.bubble_ratio:.1f}%)")
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(_summary(result))
        if args.png:
            print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
