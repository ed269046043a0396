"""The pipeline's static program: stage sizes, the device table a schedule runs as (which op
each rank runs in each lockstep tick, where its output goes, which buffer slot each in-flight
micro-batch uses) and what each tick costs in the executor's modes. Pure Python + NumPy;
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


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static program of one schedule: the device table and buffer sizes."""
    table: np.ndarray        # int32 [T, P, len(COLS)]
    slots: int               # K: buffer slots per chunk (an mb lives in slot mb % K)
    layer_index: np.ndarray  # int32 [P, chunks, n] MoE layer held at (rank, slot, i); -1 pad
    split_w: bool
    keep_residuals: bool = False
    w_slots: int = 0         # split W: store slots per chunk between B and W (mb % w_slots)

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
    keep_residuals sizes the slots for F's VJP residuals too (executor recompute=False)."""
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
    # live intervals (write tick, last-read tick) per (rank, slot) buffer, to size K. A stage's
    # input, output gradient and kept residuals are read last by its B (a split W reads only
    # what its B stored: each Linear's input and output gradient).
    act_live, grad_live, res_live, store_live = {}, {}, {}, {}
    last_use, b_tick = {}, {}
    for t in range(t_n):
        for r in range(p):
            for op, (stage, mb) in zip("FBW", ticks.table[t, r]):
                if mb < 0:
                    continue
                rank, slot = schedule.route(int(stage), int(mb))
                if rank != r:
                    raise ValueError(f"tick {t}: rank {r} runs {op}({stage},{mb}) held by {rank}")
                if op == "B":
                    last_use[(r, slot, int(mb))] = t
                    b_tick[(r, slot, int(mb))] = t
                elif op == "W" and split:
                    # B writes the store in its tick before that tick's W reads: as if written
                    # at the end of the tick before, so a later B may reuse the slot only after
                    # this W's tick (_fits)
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
                (act_live if op == "F" else grad_live)[(r2, slot2, mb)] = (
                    t, last_use[(r2, slot2, mb)])
    slots = 1
    while not all(_fits(live, slots) for live in (act_live, grad_live, res_live)):
        slots += 1
    w_slots = 0
    if split:   # W follows its B closely: its store needs far fewer slots than the activations
        w_slots = 1
        while not _fits(store_live, w_slots):
            w_slots += 1
    index = np.array([[[start[stage] + i if i < counts[stage] else -1 for i in range(n)]
                       for stage in placement] for placement in schedule.placement], np.int32)
    return Plan(table, slots, index, split, keep_residuals, w_slots)


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


def _fits(live: dict, k: int) -> bool:
    """No two buffered micro-batches of one (rank, slot) share mb % k while both are live: a
    value written at the end of tick w is read up to tick u; a later write at the end of tick
    w2 may reuse the slot if w2 >= u."""
    by_slot = {}
    for (r, slot, mb), (w, u) in live.items():
        by_slot.setdefault((r, slot, mb % k), []).append((w, u))
    for spans in by_slot.values():
        spans.sort()
        for (w1, u1), (w2, _) in zip(spans, spans[1:]):
            if w2 < u1:
                return False
    return True
