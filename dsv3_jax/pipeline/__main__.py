"""Draw a pipeline schedule and print its bubble, in-flight activations and parameter copies.

  python -m dsv3_jax.pipeline --schedule dualpipe --pp 8 --microbatches 20 --png schedule.png \
      [--F 1 --B 2 --W 1 --FB 3 --comm 0 --eager]
  python -m dsv3_jax.pipeline --table 8,32      # lockstep vs MPMD bubble of every schedule

The picture is the MPMD timeline (one row per rank, one box per op with its micro-batch number),
coloured like Figure 5 of the DeepSeek-V3 report: orange F, green B, blue W, an overlapped F&B
pair as one box half orange half green; the darker shade is chunk slot 1 (dualpipev's second
stage, dualpipe's up direction). B is the full backward and W its weight part, as in Table 2.
"""
from __future__ import annotations

import argparse
import sys

from dsv3_jax import errors
from dsv3_jax.pipeline import schedules
from dsv3_jax.pipeline import simulate as sim

COLOURS = {("F", 0): "#f5b041", ("F", 1): "#d68910", ("B", 0): "#82e0aa",
           ("B", 1): "#28b463", ("W", 0): "#85c1e9", ("W", 1): "#2e86c1"}


def timeline(schedule, F, B, W, FB, comm):
    """Per rank: list of (start, duration, ops) for each unit of the MPMD simulation."""
    cost, pair_cost = sim._costs(F, B, W, FB)
    rank_of = {op: r for r, ops in enumerate(schedule.ops) for op in ops}
    units = [sim._units(schedule, r) for r in range(schedule.ranks)]
    done, free, ptr = {}, [0.0] * schedule.ranks, [0] * schedule.ranks
    rows = [[] for _ in range(schedule.ranks)]
    progress = True
    while progress:
        progress = False
        for r in range(schedule.ranks):
            while ptr[r] < len(units[r]):
                unit, start = units[r][ptr[r]], free[r]
                ds = [d for op in unit for d in schedules.deps(schedule, op) if d not in unit]
                if any(d not in done for d in ds):
                    break
                for d in ds:
                    start = max(start, done[d] + (comm if rank_of[d] != r else 0.0))
                c = sim._unit_cost(unit, cost, pair_cost)
                for op in unit:
                    done[op] = start + c
                rows[r].append((start, c, unit))
                free[r] = start + c
                ptr[r] += 1
                progress = True
    return rows


def draw(schedule, rows, path, F, B, W, FB):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cost, pair_cost = sim._costs(F, B, W, FB)
    end = max((s + d for row in rows for s, d, _ in row), default=1.0)
    fig, ax = plt.subplots(figsize=(max(8.0, end * 0.25), 0.5 * schedule.ranks + 1.2))
    for r, row in enumerate(rows):
        y = schedule.ranks - 1 - r
        for start, _, unit in row:
            # an overlapped pair's F and B share pair_cost in proportion to their own costs
            paired = unit[0].kind == "F" and len(unit) > 1
            scale = pair_cost / max(cost["F"] + cost["B"], 1e-12) if paired else 1.0
            pieces = [(op.kind, schedule.route(op.stage, op.mb)[1], op.mb,
                       cost[op.kind] * (scale if op.kind != "W" else 1.0)) for op in unit]
            x = start
            for kind, slot, mb, w in pieces:
                if w <= 0:
                    continue
                ax.add_patch(Rectangle((x, y), w, 0.9, facecolor=COLOURS[kind, slot],
                                       edgecolor="white", linewidth=0.5))
                ax.text(x + w / 2, y + 0.45, str(mb), ha="center", va="center", fontsize=6,
                        color="white" if slot else "black")
                x += w
            if unit[0].kind == "F" and len(unit) > 1:   # overlapped pair: one black border
                ax.add_patch(Rectangle((start, y), x - start, 0.9, fill=False,
                                       edgecolor="black", linewidth=1.0))
    ax.set_xlim(0, end)
    ax.set_ylim(0, schedule.ranks)
    ax.set_yticks([schedule.ranks - 1 - r + 0.45 for r in range(schedule.ranks)])
    ax.set_yticklabels([f"rank {r}" for r in range(schedule.ranks)])
    ax.set_xlabel("time")
    ax.set_title(f"{schedule.name}: {schedule.ranks} ranks, {schedule.microbatches} "
                 f"micro-batches (F={F:g} B={B:g} W={W:g} F&B={F + B if FB is None else FB:g})")
    handles = [Rectangle((0, 0), 1, 1, facecolor=COLOURS[k, 0]) for k in "FBW"]
    ax.legend(handles, ["forward", "backward (input)", "backward (weights)"], loc="upper "
              "center", bbox_to_anchor=(0.5, -0.25), ncol=3, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def table(P, M, costs=((1, 1, 1), (1, 2, 1))):
    lines = [f"P={P} M={M}: bubble (time) MPMD / lockstep, FB = F + B"]
    for F, B, W in costs:
        for name, kw in [(n, {}) for n in schedules.SCHEDULES] + [("1f1b", {"eager": True})]:
            try:
                s = schedules.make(name, P, M, **kw)
            except schedules.ScheduleError as e:
                lines.append(f"  F={F} B={B} W={W} {name}: {e}")
                continue
            a, b = sim.simulate(s, F, B, W), sim.simulate_lockstep(s, F, B, W)
            label = name + (" eager" if kw else "")
            lines.append(f"  F={F} B={B} W={W} {label:12s} {a.bubble:6g} ({a.time:g}) / "
                         f"{b.bubble:6g} ({b.time:g})  K={sim.lockstep(s, F, B, W).slots}")
    return "\n".join(lines)


def _pair(text):
    try:
        p, m = (int(x) for x in text.split(","))
    except ValueError:
        raise errors.UserError(f"--table wants PP,MICROBATCHES (e.g. 8,32), got {text!r}")
    return p, m


@errors.cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dsv3_jax.pipeline",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--schedule", default="dualpipev",
                    help=f"one of {', '.join(schedules.SCHEDULES)}")
    ap.add_argument("--pp", type=int, default=4, help="pipeline ranks")
    ap.add_argument("--microbatches", type=int, default=None, help="default 2*pp+2")
    ap.add_argument("--png", default=None, help="write the timeline picture here")
    ap.add_argument("--F", type=float, default=1.0, help="forward chunk time")
    ap.add_argument("--B", type=float, default=2.0, help="full backward chunk time")
    ap.add_argument("--W", type=float, default=1.0, help="weight-gradient part of B")
    ap.add_argument("--FB", type=float, default=None, help="overlapped F&B time (default F+B)")
    ap.add_argument("--comm", type=float, default=0.0, help="cross-rank transfer time (MPMD)")
    ap.add_argument("--eager", action="store_true", help="1f1b: doubled warm-up")
    ap.add_argument("--table", default=None, metavar="PP,M",
                    help="print lockstep vs MPMD bubbles of every schedule and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(*_pair(args.table)))
        return 0
    M = args.microbatches if args.microbatches is not None else 2 * args.pp + 2
    s = schedules.make(args.schedule, args.pp, M, eager=args.eager)
    a = sim.simulate(s, args.F, args.B, args.W, args.FB, args.comm)
    b = sim.simulate_lockstep(s, args.F, args.B, args.W, args.FB)
    ticks = sim.lockstep(s, args.F, args.B, args.W, args.FB)
    print(f"{s.name}: {s.ranks} ranks, {s.n_stages} stages ({s.chunks} per rank), "
          f"{s.microbatches} micro-batches")
    print(f"  bubble MPMD {a.bubble:g} of time {a.time:g} (fraction {a.bubble_fraction:.3f})")
    print(f"  bubble lockstep {b.bubble:g} of time {b.time:g} (fraction "
          f"{b.bubble_fraction:.3f}), {ticks.table.shape[0]} ticks, {ticks.slots} buffer slots")
    print(f"  peak in-flight activations per rank (stage chunks): "
          f"{' '.join(map(str, a.peak_inflight))}")
    print(f"  parameter copies: {s.param_copies}")
    if args.png:
        draw(s, timeline(s, args.F, args.B, args.W, args.FB, args.comm), args.png,
             args.F, args.B, args.W, args.FB)
        print(f"  wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
