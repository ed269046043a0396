"""Time a pipeline schedule: MPMD event simulation and the lockstep (SPMD tick) packing.

Cost model (the notation of the DeepSeek-V3 report's Table 2):

  F   forward of one stage chunk;
  B   *full* backward of one chunk (input and weight gradients); the B op (input gradient only)
      costs B - W and the W op costs W;
  FB  an overlapped forward + full backward pair ("F&B"). Default F + B: no overlap gain. An
      overlapped pair (schedule.overlapped) is one unit: its F and B start together, once the
      deps of both are met, and both finish after FB - W; the pair's W (which follows it in the
      list) costs W. So a pair plus its W costs FB, as F&B does in the report.

Bubble (`SimResult.bubble`): the largest per-rank idle time, i.e. the makespan minus the busy
time of the least busy rank, where a rank's busy time counts each of its overlapped pairs (with
its W) as FB. All ranks do the same F, B, W work, so with FB = F + B every rank idles the same;
with FB < F + B the rank with the most overlapped pairs idles most. With this definition the
simulated bubbles equal Table 2's formulas exactly (tests/test_pipeline_schedules.py):

  1f1b        (PP-1)(F+B)            PP = ranks = stages; holds for any costs
  zb1p        (PP-1)(F+B-2W)         PP = ranks = stages
  dualpipev   (PP/2-1)(F&B+B-3W)     PP = 2P stages on P ranks (F, B, W per stage chunk)
  dualpipe    (PP/2-1)(F&B+B-3W)     PP = P ranks (DeepSeek's README: DualPipe uses PP devices,
                                     DualPipeV PP/2, for the same PP stages)

whenever a forward costs what an input-backward costs (F = B - W, the convention of the report's
figure, e.g. F=1 B=2 W=1), W <= F, max(F, B) <= FB <= F + B, comm = 0, and M >= the schedule's
minimum. Outside that regime the simulation is still exact for its cost model; the closed forms
are not.

Peak in-flight activations (`SimResult.peak_inflight`): per rank, the maximum over its op list
of the number of (stage, mb) whose F is done and whose B is not, in stage chunks; an overlapped
pair is one step (its B frees while its F fills). 1f1b and zb1p: P - r on rank r. dualpipev: 2P
chunks on every rank and 2P + 1 on the last (the report's PP + 1, PP = 2P); dualpipe: P, and
P + 1 on the two middle ranks (PP + 1 with PP = P).

Lockstep (`lockstep`, `simulate_lockstep`): greedy tick packing (see `_pack`); a full backward
(B with its W at once) stays in one tick, W's fill ticks only where they do not lengthen them.
Bubble (time) at M = 32, MPMD / lockstep, FB = F + B, comm 0 (`python -m dsv3_jax.pipeline
--table 8,32`); B is the full backward, so "F=B=W=1" makes the input-backward free:

  P=8            gpipe      1f1b       1f1b eager  zb1p       dualpipev   dualpipe
  F=1 B=2 W=1    21/21      21/96      21/21       7/79       14/17       6/7
  F=1 B=1 W=1    14/14      14/62      14/14       7/55       14/21       6/9
  P=16
  F=1 B=2 W=1    45/45      45/118     45/45       15/81      30/37       14/17
  F=1 B=1 W=1    30/30      30/74      30/30       15/59      30/45       14/21

Standard 1f1b and zb1p pack badly (a rank's F and the B it waits for land in different ticks);
`make("1f1b", P, M, eager=True)` reaches the MPMD time exactly at 2(P-1-r)+1 activations.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from dsv3_jax.pipeline.schedules import KINDS, Op, Schedule, ScheduleError, deps

_ROW = {k: i for i, k in enumerate(KINDS)}


@dataclasses.dataclass(frozen=True)
class SimResult:
    time: float                 # makespan
    bubble: float               # max per-rank idle: makespan - least busy rank (module doc)
    bubble_fraction: float      # bubble / time
    peak_inflight: tuple        # per rank: max (stage, mb) activations held (F done, B not)
    param_copies: int
    busy: tuple = ()            # per rank busy time (overlapped pairs at FB)


def _costs(F, B, W, FB):
    if FB is None:
        FB = F + B
    if min(F, B, W, FB) < 0 or W > B:
        raise ScheduleError(f"costs must be >= 0 with W <= B (B is the full backward), got "
                            f"F={F} B={B} W={W} FB={FB}")
    return {"F": F, "B": B - W, "W": W}, FB - W


def _units(schedule: Schedule, r: int):
    """Rank r's op list as units: (op,), a full backward (B, W), an overlapped pair (F, B) or
    an overlapped pair with a full backward (F, B, W)."""
    pairs = dict(schedule.overlapped[r]) if schedule.overlapped else {}
    full = set(schedule.full_backward[r]) if schedule.full_backward else set()
    ops, i, out = schedule.ops[r], 0, []
    while i < len(ops):
        j = pairs.get(i, i)
        end = j + 2 if j in full else j + 1
        out.append(tuple(ops[i:end]))
        i = end
    return out


def _unit_cost(unit, cost, pair_cost):
    c = sum(cost[op.kind] for op in unit)
    if len(unit) >= 2 and unit[0].kind == "F":
        c += pair_cost - cost["F"] - cost["B"]
    return c


def peak_inflight(schedule: Schedule) -> tuple:
    """Per rank: max over its op list of (stage, mb) with F done and B not done. An overlapped
    F&B pair is one step (its B frees a chunk's activations while its F fills another's)."""
    peaks = []
    for r in range(schedule.ranks):
        n = peak = 0
        for unit in _units(schedule, r):
            n += sum({"F": 1, "B": -1, "W": 0}[op.kind] for op in unit)
            peak = max(peak, n)
        peaks.append(peak)
    return tuple(peaks)


def _check_complete(schedule: Schedule):
    seen = {}
    for r, ops in enumerate(schedule.ops):
        for i, op in enumerate(ops):
            if op in seen:
                raise ScheduleError(f"{schedule.name}: {op!r} appears twice")
            seen[op] = r
    for s in range(schedule.n_stages):
        for m in range(schedule.microbatches):
            for k in KINDS:
                if Op(k, s, m) not in seen:
                    raise ScheduleError(f"{schedule.name}: {Op(k, s, m)!r} is missing")
    return seen


def _result(schedule, time, busy):
    bubble = time - min(busy)
    return SimResult(time=time, bubble=bubble, bubble_fraction=bubble / time if time else 0.0,
                     peak_inflight=peak_inflight(schedule), param_copies=schedule.param_copies,
                     busy=tuple(busy))


def simulate(schedule: Schedule, F=1.0, B=2.0, W=1.0, FB=None, comm=0.0) -> SimResult:
    """MPMD event simulation: each rank runs its units strictly in order, a unit starting when
    the rank is free and all its deps are done (+comm for a dep finished on another rank)."""
    cost, pair_cost = _costs(F, B, W, FB)
    rank_of = _check_complete(schedule)
    units = [_units(schedule, r) for r in range(schedule.ranks)]
    done = {}
    free = [0.0] * schedule.ranks
    busy = [0.0] * schedule.ranks
    ptr = [0] * schedule.ranks
    progress = True
    while progress:
        progress = False
        for r in range(schedule.ranks):
            while ptr[r] < len(units[r]):
                unit = units[r][ptr[r]]
                start = free[r]
                ready = True
                for op in unit:
                    for d in deps(schedule, op):
                        if d in unit:
                            continue
                        if d not in done:
                            ready = False
                            break
                        start = max(start, done[d] + (comm if rank_of[d] != r else 0.0))
                    if not ready:
                        break
                if not ready:
                    break
                c = _unit_cost(unit, cost, pair_cost)
                for op in unit:
                    done[op] = start + c
                free[r] = start + c
                busy[r] += c
                ptr[r] += 1
                progress = True
    stuck = [(r, units[r][ptr[r]]) for r in range(schedule.ranks) if ptr[r] < len(units[r])]
    if stuck:
        desc = "; ".join(f"rank {r} waits at {'&'.join(map(repr, u))}" for r, u in stuck)
        raise ScheduleError(f"{schedule.name}: deadlock: {desc}")
    return _result(schedule, max(free), busy)


# ---------------------------------------------------------------------------------------------
# Lockstep (SPMD) packing


@dataclasses.dataclass(frozen=True)
class Ticks:
    table: np.ndarray   # int32 [T, P, 3, 2]: per tick and rank, rows F, B, W: (stage, mb) or -1
    slots: int          # K: max activations in flight on one (rank, chunk) within the ticks


def _pack(schedule: Schedule, cost=None, pair_cost=None):
    """Greedy lockstep packing.

    In each tick every rank may take a prefix of its remaining list holding at most one F, one
    B and one W whose deps all finished in earlier ticks (a W may share the tick of its B). Each
    rank's longest such prefix, less its trailing W's, is its core; the tick's cost is the
    costliest core, and every rank then takes its longest prefix that costs no more than that
    (so a W rides along only where it does not lengthen the tick). If every core is empty the
    ranks take their whole prefixes (W only).
    """
    _check_complete(schedule)
    if cost is None:
        cost, pair_cost = _costs(1.0, 2.0, 1.0, None)
    P = schedule.ranks
    pairs = [{(schedule.ops[r][i], schedule.ops[r][j]) for i, j in schedule.overlapped[r]}
             if schedule.overlapped else set() for r in range(P)]

    def tick_cost(r, taken):
        c = sum(cost[k] for k in taken)
        if "F" in taken and "B" in taken and (taken["F"], taken["B"]) in pairs[r]:
            c += pair_cost - cost["F"] - cost["B"]
        return c

    full = [set(schedule.full_backward[r]) if schedule.full_backward else set()
            for r in range(P)]
    ptr = [0] * P
    tick_of = {}
    ticks = []
    t = 0
    while any(ptr[r] < len(schedule.ops[r]) for r in range(P)):
        prefixes = []
        for r in range(P):
            ops, taken, i, pre = schedule.ops[r], {}, ptr[r], []
            while i < len(ops):
                op = ops[i]
                # a full backward (B and its W) shares one tick, so it needs room for the W too
                if op.kind in taken or (i in full[r] and "W" in taken):
                    break
                ok = all(tick_of.get(d, t) < t or (op.kind == "W" and taken.get("B") == d)
                         for d in deps(schedule, op))
                if not ok:
                    break
                taken[op.kind] = op
                pre.append(op)
                i += 1
            prefixes.append(pre)

        def cut_ok(r, n):   # a prefix of length n does not split a full backward from its W
            return not (ptr[r] + n - 1) in full[r]

        cores = []
        for r, pre in enumerate(prefixes):
            n = len(pre)
            while n and pre[n - 1].kind == "W" and cut_ok(r, n - 1):
                n -= 1
            cores.append(n)
        limit = max(tick_cost(r, {op.kind: op for op in prefixes[r][:cores[r]]})
                    for r in range(P))
        row = []
        for r, pre in enumerate(prefixes):
            n = len(pre) if limit == 0 else cores[r]
            while n < len(pre) and tick_cost(r, {op.kind: op for op in pre[:n + 1]}) <= limit:
                n += 1
            while not cut_ok(r, n):
                n += 1
            taken = {op.kind: op for op in pre[:n]}
            ptr[r] += n
            row.append(taken)
        for taken in row:
            for op in taken.values():
                tick_of[op] = t
        if not any(row):
            stuck = "; ".join(f"rank {r} waits at {schedule.ops[r][ptr[r]]!r}"
                              for r in range(P) if ptr[r] < len(schedule.ops[r]))
            raise ScheduleError(f"{schedule.name}: lockstep deadlock at tick {t}: {stuck}")
        ticks.append(row)
        t += 1
    return ticks, tick_cost


def lockstep(schedule: Schedule, F=1.0, B=2.0, W=1.0, FB=None) -> Ticks:
    """Pack the schedule into lockstep ticks (see `_pack`); the costs only steer where W's go."""
    ticks, _ = _pack(schedule, *_costs(F, B, W, FB))
    P = schedule.ranks
    table = np.full((len(ticks), P, 3, 2), -1, np.int32)
    for t, row in enumerate(ticks):
        for r, taken in enumerate(row):
            for k, op in taken.items():
                table[t, r, _ROW[k]] = (op.stage, op.mb)
    return Ticks(table=table, slots=_slots(schedule, table))


def _slots(schedule: Schedule, table: np.ndarray) -> int:
    """Max activations in flight on one (rank, chunk slot) when each tick runs F, then B, then W."""
    live = {}
    K = 0
    for t in range(table.shape[0]):
        for r in range(table.shape[1]):
            fs, fm = table[t, r, 0]
            if fm >= 0:
                key = (r, schedule.route(int(fs), int(fm))[1])
                live[key] = live.get(key, 0) + 1
                K = max(K, live[key])
            bs, bm = table[t, r, 1]
            if bm >= 0:
                key = (r, schedule.route(int(bs), int(bm))[1])
                live[key] -= 1
    return K


def simulate_lockstep(schedule: Schedule, F=1.0, B=2.0, W=1.0, FB=None) -> SimResult:
    """Time of the lockstep packing: the sum over ticks of the slowest rank's work in the tick.
    An overlapped pair whose F and B land in the same tick costs FB - W (its W costs W)."""
    P = schedule.ranks
    ticks, tick_cost = _pack(schedule, *_costs(F, B, W, FB))
    busy = [0.0] * P
    time = 0.0
    for row in ticks:
        worst = 0.0
        for r, taken in enumerate(row):
            c = tick_cost(r, taken)
            busy[r] += c
            worst = max(worst, c)
        time += worst
    return _result(schedule, time, busy)
