"""The pipeline's static program: stage sizes, the device table a schedule runs as (which op
each rank runs in each lockstep tick, where its output goes, which buffer row each in-flight
value uses) and what each tick costs in the executor's modes. Pure Python + NumPy;
`dsv3_jax.pipeline.executor` runs the table."""
from __future__ import annotations

import dataclasses

import numpy as np

NONE, FIRST, MID, LAST = 0, 1, 2, 3          # stage kinds (the branch index of a tick's op)
STAY, RIGHT, LEFT, LOCAL = 0, 1, 2, 3        # where an op's output goes
# columns of the device table, per tick and rank
COLS = ("f_kind", "f_slot", "f_mb", "f_dir", "b_kind", "b_slot", "b_mb", "b_dir",
        "w_kind", "w_slot", "w_mb",
        "ra_slot", "ra_mb", "la_slot", "la_mb", "oa_slot", "oa_mb",    # activations in
        "rg_slot", "rg_mb", "lg_slot", "lg_mb", "og_slot", "og_mb")    # output grads in
C = {name: i for i, name in enumerate(COLS)}


# the executor's buffers of in-flight values: stage inputs (activations), output gradients,
# kept VJP residuals (recompute=False) and the split-W store (each deferred GEMM's input and
# output gradient, from B to W)
BUFFERS = ("act", "grad", "res", "store")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static program of one schedule: the device table and the buffers' rows.

    Each buffer is one array of `n_rows[b] + 1` rows per rank (the last a scratch row that idle
    writes go to); `rows[b][r, slot, mb]` is the row rank r keeps micro-batch mb's value of
    chunk slot `slot` in, from the tick it is written to the tick it is last read
    (`_assign_rows`): the rows are the most values live at once on the busiest rank, whatever
    chunk they belong to, so a two-chunk schedule's buffers are its peak in flight, not twice
    the busiest chunk's."""
    table: np.ndarray        # int32 [T, P, len(COLS)]
    rows: dict               # buffer -> int32 [P, chunks, M]; n_rows[b] (scratch) where unused
    n_rows: dict             # buffer -> rows per rank (the scratch row not counted)
    layer_index: np.ndarray  # int32 [P, chunks, n] MoE layer held at (rank, slot, i); -1 pad
    split_w: bool
    keep_residuals: bool = False

    @property
    def in_layer_order(self) -> bool:
        """Whether [P, chunks, n] is the layer axis itself, reshaped (every layer once, in
        order, no pads): the executor's stage stack is then a reshape of the at-rest MoE stack
        (sharded over `pipeline` by layer), else a new buffer gathered by `layer_index`."""
        flat = self.layer_index.reshape(-1)
        return bool(np.array_equal(flat, np.arange(flat.size)))

    @property
    def layer_slots(self) -> int:
        """MoE layer slots per rank in the executor's stage stack (chunks x n)."""
        return int(np.prod(self.layer_index.shape[1:]))


def _kind(stage: int, n_stages: int) -> int:
    return FIRST if stage == 0 else LAST if stage == n_stages - 1 else MID


def stage_layers(num_moe_layers: int, n_stages: int, first_extra: float = 0.0,
                 last_extra: float = 0.0) -> list[int]:
    """MoE layers per stage, balanced by cost: the first stage also runs the embedding and the
    dense layers (`first_extra` MoE-layer equivalents), the last the head and MTP modules
    (`last_extra`). No stage gets more than ceil(layers / stages) (in one SPMD program every
    stage computes as many layer slots as the longest; shorter ones are padding); within that
    cap each layer goes to the currently cheapest stage (ties: the earliest), so a stage with
    extras holds fewer MoE layers, possibly none."""
    extra = [0.0] * n_stages
    extra[0] += first_extra
    extra[-1] += last_extra
    counts = [0 if e else 1 for e in extra]   # the first/last stage may hold only its extras
    if num_moe_layers < max(sum(counts), 1):
        raise ValueError(f"{num_moe_layers} MoE layers do not split into {n_stages} stages (each "
                         "stage without the embedding/dense layers or the head/MTP needs at "
                         "least one)")
    cap = -(-num_moe_layers // n_stages)   # every rank computes the longest stage's layers
    for _ in range(num_moe_layers - sum(counts)):
        s = min((i for i in range(n_stages) if counts[i] < cap),
                key=lambda i: (extra[i] + counts[i], i))
        counts[s] += 1
    return counts


def layer_costs(cfg) -> tuple[float, float]:
    """(first, last) stage extras in MoE-layer equivalents: a dense layer or an MTP module
    counts as one MoE layer (the release's dense FFN width equals the MoE's active width)."""
    return float(cfg.num_dense_layers), float(cfg.num_nextn_predict_layers)


def make_plan(schedule, ticks, counts: list[int], split_w: bool = False,
              keep_residuals: bool = False) -> Plan:
    """The device table from a schedule, its lockstep ticks (dsv3_jax.pipeline.simulate) and
    the MoE layers per stage (`stage_layers`); shorter stages are padded with skipped layers.
    split_w=False runs a zero-bubble schedule's W with its B (one VJP; the W ops are dropped);
    keep_residuals gives F's VJP residuals rows too (executor recompute=False), and then a
    stage's input is free once its F has run."""
    p, s_n = schedule.ranks, schedule.n_stages
    if len(counts) != s_n:
        raise ValueError(f"{len(counts)} stage sizes for {s_n} stages")
    n = max(counts)
    start = np.concatenate([[0], np.cumsum(counts)])
    t_n = ticks.table.shape[0]
    table = np.full((t_n, p, len(COLS)), -1, np.int32)
    for col in ("f_kind", "b_kind", "w_kind", "f_dir", "b_dir"):
        table[:, :, C[col]] = 0
    split = bool(schedule.split_w) and split_w
    # live intervals (write tick, last-read tick) of each buffer's values, keyed (rank, slot,
    # mb), for their rows. A stage's input is read last by its F when its residuals are kept,
    # else by its B (the recomputed forward); its output gradient and kept residuals by its B;
    # a split W reads only what its B stored (each Linear's input and output gradient).
    act_live, grad_live, res_live, store_live = {}, {}, {}, {}
    last_use, b_tick, f_tick = {}, {}, {}
    for t in range(t_n):
        for r in range(p):
            for op, (stage, mb) in zip("FBW", ticks.table[t, r]):
                if mb < 0:
                    continue
                rank, slot = schedule.route(int(stage), int(mb))
                if rank != r:
                    raise ValueError(f"tick {t}: rank {r} runs {op}({stage},{mb}) held by {rank}")
                if op == "F":
                    f_tick[(r, slot, int(mb))] = t
                elif op == "B":
                    last_use[(r, slot, int(mb))] = t
                    b_tick[(r, slot, int(mb))] = t
                elif op == "W" and split:
                    # B writes the store in its tick before that tick's W reads: as if written
                    # at the end of the tick before, so a later B may reuse the row only after
                    # this W's tick (_assign_rows)
                    store_live[(r, slot, int(mb))] = (b_tick[(r, slot, int(mb))] - 1, t)
    for t in range(t_n):
        for r in range(p):
            for op, (stage, mb) in zip("FBW", ticks.table[t, r]):
                stage, mb = int(stage), int(mb)
                if mb < 0 or (op == "W" and not split):
                    continue
                _, slot = schedule.route(stage, mb)
                o = op.lower()
                table[t, r, C[f"{o}_kind"]] = _kind(stage, s_n)
                table[t, r, C[f"{o}_slot"]] = slot
                table[t, r, C[f"{o}_mb"]] = mb
                if op == "W":
                    continue
                if op == "F" and keep_residuals:   # its residuals, written at the tick's end
                    res_live[(r, slot, mb)] = (t, last_use[(r, slot, mb)])
                nxt = stage + 1 if op == "F" else stage - 1
                if not 0 <= nxt < s_n:
                    continue
                r2, slot2 = schedule.route(nxt, mb)
                d = {r: LOCAL, r + 1: RIGHT, r - 1: LEFT}.get(r2)
                if d is None:
                    raise ValueError(f"{op}({stage},{mb}) on rank {r} feeds rank {r2}, "
                                     "not a neighbour")
                table[t, r, C[f"{o}_dir"]] = d
                a_or_g = "a" if op == "F" else "g"
                prefix = {RIGHT: "r", LEFT: "l", LOCAL: "o"}[d]
                table[t, r2, C[f"{prefix}{a_or_g}_slot"]] = slot2
                table[t, r2, C[f"{prefix}{a_or_g}_mb"]] = mb
                key = (r2, slot2, mb)
                if op == "B":
                    grad_live[key] = (t, last_use[key])
                else:
                    act_live[key] = (t, f_tick[key] if keep_residuals else last_use[key])
    shape = (p, schedule.chunks, schedule.microbatches)
    rows, n_rows = {}, {}
    for name, live in zip(BUFFERS, (act_live, grad_live, res_live, store_live)):
        rows[name], n_rows[name] = _assign_rows(live, shape)
    index = np.array([[[start[stage] + i if i < counts[stage] else -1 for i in range(n)]
                       for stage in placement] for placement in schedule.placement], np.int32)
    return Plan(table, rows, n_rows, index, split, keep_residuals)


def op_costs(F: float, B: float, W: float, split_w: bool, recompute: bool = True) -> dict:
    """What each op costs in this executor, from a stage's forward F, full backward B and its
    deferred weight part W (the Linears' dW GEMMs, `common.deferred_weight_grads`). With
    `recompute`, B first re-runs the stage's forward under `jax.vjp`; without, it calls the VJP
    F kept. A split W runs from what its B stored (each Linear's input and output gradient): no
    forward, no input-gradient chain."""
    f = F if recompute else 0.0
    if split_w:
        return {"F": F, "B": f + B - W, "W": W}
    return {"F": F, "B": f + B, "W": 0.0}


def rank_costs(plan: Plan, F: float, B: float, W: float, branched: bool = True,
               recompute: bool = True) -> np.ndarray:
    """[T, P] work of each rank in each tick of `plan` as this executor runs it (`op_costs`):
    branched, the rank's own ops (an idle op costs nothing); branch-free, every op of the
    plan, idle or not."""
    cost = op_costs(F, B, W, plan.split_w, recompute)
    ops = [("F", "f_kind"), ("B", "b_kind")] + ([("W", "w_kind")] if plan.split_w else [])
    if not branched:
        return np.full(plan.table.shape[:2], float(sum(cost[o] for o, _ in ops)))
    return sum(cost[o] * (plan.table[:, :, C[col]] > 0) for o, col in ops).astype(float)


def tick_costs(plan: Plan, F: float, B: float, W: float, branched: bool = True,
               recompute: bool = True) -> np.ndarray:
    """[T] time of each tick in lockstep: its slowest rank's work (`rank_costs`)."""
    return rank_costs(plan, F, B, W, branched, recompute).max(axis=1)


def _assign_rows(live: dict, shape: tuple) -> tuple[np.ndarray, int]:
    """(rows [P, chunks, M], rows per rank) for the values of `live`, (rank, slot, mb) -> (w,
    u): written at the end of tick w, read up to tick u. A value written at the end of tick w2
    may take the row of one last read at u <= w2. Per rank, in order of writing, each value
    takes the lowest free row (first fit by start is optimal for intervals: the rows are the
    most values live at once). Unused entries point at the scratch row."""
    rows = np.full(shape, -1, np.int32)
    n_rows = 0
    for r in range(shape[0]):
        free_at = []   # per row: the tick its current value is last read
        for w, u, slot, mb in sorted((w, u, s, b) for (rr, s, b), (w, u) in live.items()
                                     if rr == r):
            i = next((i for i, f in enumerate(free_at) if f <= w), len(free_at))
            if i == len(free_at):
                free_at.append(u)
            free_at[i] = u
            rows[r, slot, mb] = i
        n_rows = max(n_rows, len(free_at))
    rows[rows < 0] = n_rows
    return rows, n_rows
