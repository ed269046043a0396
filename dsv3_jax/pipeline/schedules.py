"""Pipeline schedules as per-rank op lists (pure Python; no JAX).

A schedule says, for each pipeline rank, the order in which it runs its ops. An op is one of

  F(stage, mb)  forward of micro-batch `mb` through `stage`
  B(stage, mb)  backward for the stage's *input* (the activation gradient sent upstream)
  W(stage, mb)  backward for the stage's *weights*

Stages are numbered in model order: stage 0 holds the embedding, stage n_stages-1 the head and
loss. Every (stage, mb) has exactly one F, one B and one W, on the rank holding that stage. The
dependencies are F(s,m) <- F(s-1,m); B(s,m) <- F(s,m), B(s+1,m); W(s,m) <- B(s,m). On each
(rank, chunk slot) the F's and the B's run in increasing micro-batch order, so the activations
in flight on a chunk always form a contiguous run of micro-batches and an executor could keep
them in K buffers indexed by mb % K (`simulate.lockstep(...).slots` gives K); the executor
here gives each value a row of a buffer its rank's chunks share (`table.make_plan`).

Schedules (`make(name, ranks, microbatches)`):

  gpipe      all F, then all B (each W right after its B). P stages on P ranks.
  1f1b       standard one-forward-one-backward: P-1-r warm-up forwards on rank r. Bubble
             (P-1)(F+B). `make("1f1b", P, M, eager=True)` doubles the warm-up to 2(P-1-r)
             forwards (more memory, 2(P-1-r)+1 activations) so that a lockstep (SPMD) executor
             pairing one F with one B per tick reaches the MPMD time.
  zb1p       ZB-H1 of the zero-bubble paper (Qi et al. 2023): 1F1B with B split into B and W,
             rank r running each W r steps after its B (the last r W's fill its cool-down).
             Bubble (P-1)(F+B-2W), activations as 1F1B (P-r on rank r).
  dualpipev  DeepSeek's DualPipeV ("cut-in-half" DualPipe): 2P stages on P ranks, rank r holds
             stage r (chunk slot 0) and stage 2P-1-r (slot 1); the V turns on the last rank
             (stage P-1 -> P is a local hand-off). One parameter copy. Needs M >= 2P.
  dualpipe   DeepSeek's bidirectional DualPipe: P stages, each held by two ranks. Rank r holds
             stage r for the "down" direction (slot 0) and stage P-1-r for the "up" direction
             (slot 1), so two parameter copies whose gradients must be summed. Micro-batches
             0 .. M/2-1 go down (enter at rank 0, loss on rank P-1); M/2 .. M-1 go up (enter at
             rank P-1, loss on rank 0) -- as in DeepSeek's example, where the first rank gets
             the first half of the inputs. Needs P even, M even and M >= 2P.

dualpipev and dualpipe follow the eight sections of DeepSeek's `step()` (deepseek-ai/DualPipe,
dualpipe/dualpipev.py and dualpipe/dualpipe.py): nF0, nF0F1, nB1W1F1, nF0B1F1B0, nB1F1B0,
nB1B0, nWB0, nW. A backward run with zero-bubble deferral puts its W on a FIFO queue that each
`_weight_chunk` pops; a backward without deferral (including the B of every overlapped F&B pair)
is followed at once by its W. An overlapped F&B pair is emitted as F immediately followed by B;
`Schedule.overlapped[r]` lists the (F index, B index) pairs of rank r's op list.
"""
from __future__ import annotations

import collections
import dataclasses

from dsv3_jax.errors import UserError

SCHEDULES = ("gpipe", "1f1b", "zb1p", "dualpipev", "dualpipe")
KINDS = ("F", "B", "W")


class ScheduleError(UserError):
    """An invalid (schedule, ranks, micro-batches) combination or a malformed schedule."""


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str      # "F" forward, "B" backward for inputs, "W" backward for weights
    stage: int     # 0 .. n_stages-1 in model order
    mb: int        # micro-batch 0 .. M-1

    def __repr__(self):
        return f"{self.kind}({self.stage},{self.mb})"


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str
    ranks: int            # P, pipeline ranks (devices)
    microbatches: int     # M
    n_stages: int         # P (gpipe, 1f1b, zb1p, dualpipe) or 2P (dualpipev)
    chunks: int           # model chunks held per rank: 1 or 2
    placement: tuple      # placement[r][j] = stage held in chunk slot j of rank r
    ops: tuple            # ops[r] = tuple of Op in execution order on rank r
    split_w: bool         # W ops scheduled apart from their B (zb1p, dualpipe*)
    param_copies: int     # 1, or 2 for dualpipe
    overlapped: tuple = ()  # overlapped[r] = tuple of (F index, B index) pairs in ops[r]
    full_backward: tuple = ()  # full_backward[r] = indices in ops[r] of B ops run as a full
    #                            backward: their W follows at once and the input gradient leaves
    #                            the rank only after that W (a B without zero-bubble deferral)

    def direction(self, mb: int) -> int:
        """0: the micro-batch flows rank 0 -> P-1 (down); 1: rank P-1 -> 0 (up, dualpipe only)."""
        if self.name == "dualpipe":
            return int(mb >= self.microbatches // 2)
        return 0

    def route(self, stage: int, mb: int) -> tuple:
        """(rank, chunk slot) that runs (stage, mb)."""
        if not (0 <= stage < self.n_stages and 0 <= mb < self.microbatches):
            raise ScheduleError(f"{self.name}: no stage {stage} / micro-batch {mb} "
                                f"(n_stages={self.n_stages}, microbatches={self.microbatches})")
        P = self.ranks
        if self.name == "dualpipe":
            return (stage, 0) if self.direction(mb) == 0 else (P - 1 - stage, 1)
        if self.name == "dualpipev":
            return (stage, 0) if stage < P else (2 * P - 1 - stage, 1)
        return (stage, 0)

    def is_overlapped(self, rank: int, index: int) -> bool:
        return any(index in pair for pair in (self.overlapped[rank] if self.overlapped else ()))


# ---------------------------------------------------------------------------------------------
# Builders


def _check(name, P, M):
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown pipeline schedule {name!r}; known: {', '.join(SCHEDULES)}")
    if not isinstance(P, int) or P < 1:
        raise ScheduleError(f"{name}: pipeline ranks must be >= 1, got {P}")
    if not isinstance(M, int) or M < 1:
        raise ScheduleError(f"{name}: micro-batches must be >= 1, got {M}")
    if name == "dualpipe":
        if P % 2:
            raise ScheduleError(f"dualpipe needs an even number of pipeline ranks (each rank pairs "
                                f"with its mirror P-1-r), got {P}; use dualpipev for odd counts")
        if M % 2 or M < 2 * P:
            raise ScheduleError(f"dualpipe needs an even number of micro-batches >= 2*ranks = "
                                f"{2 * P} (half go each way), got {M}")
    if name == "dualpipev" and M < 2 * P:
        raise ScheduleError(f"dualpipev needs micro-batches >= 2*ranks = {2 * P} (its steady "
                            f"section runs M-2P+r+1 times), got {M}")
    if name in ("1f1b", "zb1p") and M < P:
        raise ScheduleError(f"{name} needs micro-batches >= ranks = {P} (fewer leaves the "
                            f"warm-up unfinished and the schedule degenerates to gpipe), got {M}")


def make(name: str, ranks: int, microbatches: int, *, eager: bool = False) -> Schedule:
    """Build schedule `name` for `ranks` pipeline ranks and `microbatches` micro-batches.

    eager=True (1f1b only): warm-up of 2(P-1-r) forwards instead of P-1-r (see module doc).
    Raises ScheduleError for an unknown name or an invalid (ranks, microbatches).
    """
    _check(name, ranks, microbatches)
    if eager and name != "1f1b":
        raise ScheduleError(f"eager warm-up is a 1f1b variant, not {name}")
    P, M = ranks, microbatches
    if name == "gpipe":
        ops = [_gpipe(r, M) for r in range(P)]
        return _finish(name, P, M, P, 1, [(r,) for r in range(P)], ops, False, 1)
    if name == "1f1b":
        ops = [_one_f_one_b(r, P, M, eager) for r in range(P)]
        return _finish(name, P, M, P, 1, [(r,) for r in range(P)], ops, False, 1)
    if name == "zb1p":
        ops = [_zb_h1(r, P, M) for r in range(P)]
        return _finish(name, P, M, P, 1, [(r,) for r in range(P)], ops, True, 1)
    if name == "dualpipev":
        built = [_DualBuilder(r, P, M, bidirectional=False).run() for r in range(P)]
        return _finish(name, P, M, 2 * P, 2, [(r, 2 * P - 1 - r) for r in range(P)],
                       [b[0] for b in built], True, 1, [b[1] for b in built],
                       [b[2] for b in built])
    built = [_DualBuilder(r, P, M, bidirectional=True).run() for r in range(P)]
    return _finish(name, P, M, P, 2, [(r, P - 1 - r) for r in range(P)],
                   [b[0] for b in built], True, 2, [b[1] for b in built],
                   [b[2] for b in built])


def _finish(name, P, M, n_stages, chunks, placement, ops, split_w, copies, overlapped=None,
            full=None):
    overlapped = overlapped or [() for _ in range(P)]
    if full is None:   # non-split schedules: every B is a full backward
        full = [[] if split_w else [i for i, op in enumerate(o) if op.kind == "B"] for o in ops]
    s = Schedule(name, P, M, n_stages, chunks, tuple(tuple(p) for p in placement),
                 tuple(tuple(o) for o in ops), split_w, copies,
                 tuple(tuple(o) for o in overlapped), tuple(tuple(f) for f in full))
    validate(s)
    return s


def _gpipe(r, M):
    ops = [Op("F", r, m) for m in range(M)]
    for m in range(M):
        ops += [Op("B", r, m), Op("W", r, m)]
    return ops


def _one_f_one_b(r, P, M, eager=False):
    warm = min(M, (2 if eager else 1) * (P - 1 - r))
    ops = [Op("F", r, m) for m in range(warm)]
    for m in range(M - warm):
        ops += [Op("F", r, warm + m), Op("B", r, m), Op("W", r, m)]
    for m in range(M - warm, M):
        ops += [Op("B", r, m), Op("W", r, m)]
    return ops


def _zb_h1(r, P, M):
    """ZB-H1: the F and B order of 1F1B; rank r runs each W r steps after its B.

    Steady state: F, B, then the W of the B issued r steps earlier (none in the first r steps),
    so the backward wave runs through the ranks at input-gradient speed while every rank holds
    at most P micro-batches between F and W (1F1B's peak, on rank 0). Cool-down: each B is
    followed by the oldest pending W, filling the wait for the next gradient from downstream;
    the last r W's end the list.
    """
    warm = min(M, P - 1 - r)
    ops = [Op("F", r, m) for m in range(warm)]
    pending = collections.deque()
    for m in range(M - warm):
        ops += [Op("F", r, warm + m), Op("B", r, m)]
        pending.append(m)
        if len(pending) > r:
            ops.append(Op("W", r, pending.popleft()))
    for m in range(M - warm, M):
        ops.append(Op("B", r, m))
        pending.append(m)
        ops.append(Op("W", r, pending.popleft()))
    ops += [Op("W", r, m) for m in pending]
    return ops


class _DualBuilder:
    """Port of the section structure of DeepSeek's DualPipe(V) `step()` for one rank.

    `phase` is the reference's chunk index: for dualpipev phase 0 is stage r and phase 1 stage
    2P-1-r. For dualpipe the reference maps phase -> copy with `phase ^ is_in_second_half`;
    copy 0 is the down direction (stage r, micro-batches 0..M/2-1), copy 1 the up direction
    (stage P-1-r, micro-batches M/2..M-1). Each copy runs its micro-batches in order.
    """

    def __init__(self, r, P, M, bidirectional):
        self.r, self.P, self.M, self.bi = r, P, M, bidirectional
        self.ops, self.pairs, self.full = [], [], []
        self.f_next = [0, 0]
        self.b_next = [0, 0]
        self.wq = collections.deque()
        if bidirectional:
            self.second_half = r >= P // 2
            self.stages = (r, P - 1 - r)
            self.mb0 = (0, M // 2)
        else:
            self.second_half = False
            self.stages = (r, 2 * P - 1 - r)
            self.mb0 = (0, 0)

    def _copy(self, phase):
        return phase ^ int(self.second_half)

    def _f(self, phase):
        c = self._copy(phase)
        op = Op("F", self.stages[c], self.mb0[c] + self.f_next[c])
        self.f_next[c] += 1
        self.ops.append(op)
        return len(self.ops) - 1

    def _b(self, phase, zb=False):
        c = self._copy(phase)
        op = Op("B", self.stages[c], self.mb0[c] + self.b_next[c])
        self.b_next[c] += 1
        self.ops.append(op)
        i = len(self.ops) - 1
        w = Op("W", op.stage, op.mb)
        if zb:
            self.wq.append(w)
        else:
            self.full.append(i)
            self.ops.append(w)
        return i

    def _w(self):
        self.ops.append(self.wq.popleft())

    def _fb(self, phase0, phase1):
        i = self._f(phase0)
        j = self._b(phase1)
        self.pairs.append((i, j))

    def run(self):
        r, P, M = self.r, self.P, self.M
        if self.bi:
            H = P // 2
            h = min(r, P - 1 - r)
            n1, n2, n3 = (H - h - 1) * 2, h + 1, H - h - 1
            n4 = M // 2 - P + h + 1
            special = r in (H - 1, H)           # the reference's is_middle_rank
            parity = h
        else:
            n1, n2, n3 = (P - r - 1) * 2, r + 1, P - r - 1
            n4 = M - 2 * P + r + 1
            special = r == P - 1                # the reference's is_last_rank
            parity = r
        n5, n6, n7, n8 = n3, n2, n3, n2
        for _ in range(n1):                     # 1: nF0
            self._f(0)
        for _ in range(n2):                     # 2: nF0F1
            self._f(0)
            self._f(1)
        for _ in range(n3):                     # 3: nB1W1F1 (zero bubble)
            self._b(1, zb=True)
            self._w()
            self._f(1)
        for i in range(n4):                     # 4: nF0B1F1B0 (main)
            if i == 0 and special:              # not overlapped, to shrink the bubble
                self._f(0)
                self._b(1)
            else:
                self._fb(0, 1)
            self._fb(1, 0)
        for _ in range(n5):                     # 5: nB1F1B0
            self._b(1)
            self._fb(1, 0)
        zb = False                              # 6: nB1B0, second half with zero bubble
        for i in range(n6):
            if i == n6 // 2 and parity % 2 == 1:
                zb = True
            self._b(1, zb=zb)
            if i == n6 // 2 and parity % 2 == 0:
                zb = True
            self._b(0, zb=zb)
        for _ in range(n7):                     # 7: nWB0 (zero bubble)
            self._w()
            self._b(0, zb=True)
        for _ in range(n8):                     # 8: nW
            self._w()
        assert not self.wq, "weight-gradient queue not empty"
        return self.ops, self.pairs, self.full


# ---------------------------------------------------------------------------------------------
# Validation


def deps(schedule: Schedule, op: Op) -> list:
    """Ops that must finish before `op` starts."""
    s, m, last = op.stage, op.mb, schedule.n_stages - 1
    if op.kind == "F":
        return [Op("F", s - 1, m)] if s > 0 else []
    if op.kind == "B":
        return [Op("F", s, m)] + ([Op("B", s + 1, m)] if s < last else [])
    return [Op("B", s, m)]


def validate(schedule: Schedule) -> None:
    """Every (stage, mb) has one F, B, W on the rank routing it; per-chunk mb order increasing;
    W right after B where W is not split; overlapped pairs are an F followed by a B."""
    s = schedule
    if len(s.ops) != s.ranks or len(s.placement) != s.ranks:
        raise ScheduleError(f"{s.name}: expected {s.ranks} per-rank op lists")
    seen = {}
    for r, ops in enumerate(s.ops):
        last = {}
        for i, op in enumerate(ops):
            if op.kind not in KINDS:
                raise ScheduleError(f"{s.name}: rank {r} op {i} {op!r}: unknown kind")
            rank, slot = s.route(op.stage, op.mb)
            if rank != r:
                raise ScheduleError(f"{s.name}: {op!r} is on rank {r}, but rank {rank} holds "
                                    f"stage {op.stage} for micro-batch {op.mb}")
            if op in seen:
                raise ScheduleError(f"{s.name}: {op!r} appears twice (rank {seen[op][0]} op "
                                    f"{seen[op][1]} and rank {r} op {i})")
            seen[op] = (r, i)
            if op.kind in "FB":
                key = (op.kind, slot)
                if key in last and op.mb <= last[key]:
                    raise ScheduleError(f"{s.name}: rank {r} op {i} {op!r} comes after "
                                        f"micro-batch {last[key]} on the same chunk")
                last[key] = op.mb
            if not s.split_w and op.kind == "B" and (i + 1 >= len(ops)
                                                     or ops[i + 1] != Op("W", op.stage, op.mb)):
                raise ScheduleError(f"{s.name}: {op!r} is not followed by its W")
        for i in (s.full_backward[r] if s.full_backward else ()):
            if ops[i].kind != "B" or i + 1 >= len(ops) or ops[i + 1] != Op("W", ops[i].stage,
                                                                           ops[i].mb):
                raise ScheduleError(f"{s.name}: rank {r} op {i} is marked a full backward but "
                                    f"is not a B followed by its W")
        for i, j in (s.overlapped[r] if s.overlapped else ()):
            if j != i + 1 or ops[i].kind != "F" or ops[j].kind != "B":
                raise ScheduleError(f"{s.name}: rank {r} overlapped pair ({i}, {j}) is not an F "
                                    f"followed by a B")
    for st in range(s.n_stages):
        for m in range(s.microbatches):
            for k in KINDS:
                if Op(k, st, m) not in seen:
                    raise ScheduleError(f"{s.name}: {Op(k, st, m)!r} is missing")
