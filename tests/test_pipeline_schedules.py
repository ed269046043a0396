"""Pipeline schedules (dsv3_jax.pipeline): op-list properties, Table 2 bubbles and activations of
the DeepSeek-V3 report, DualPipeV's list against DeepSeek's step() sections, the lockstep
packing, and the drawing CLI. Pure Python; no JAX."""
import os
import subprocess
import sys

import pytest

from dsv3_jax.pipeline import SCHEDULES, Op, ScheduleError, deps, make
from dsv3_jax.pipeline.simulate import lockstep, simulate, simulate_lockstep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def min_microbatches(name, P):
    return {"dualpipe": 2 * P, "dualpipev": 2 * P, "1f1b": P, "zb1p": P, "gpipe": 1}[name]


def cases():
    for name in SCHEDULES:
        for P in (1, 2, 4, 8):
            if name == "dualpipe" and P % 2:
                continue
            lo = min_microbatches(name, P)
            for M in sorted({lo, lo + 2, 3 * lo + 2}):
                yield name, P, M


@pytest.mark.parametrize("name,P,M", list(cases()))
def test_every_op_once_on_its_rank_in_order(name, P, M):
    s = make(name, P, M)
    seen = {}
    for r, ops in enumerate(s.ops):
        last = {}
        for i, op in enumerate(ops):
            assert op not in seen, op
            seen[op] = r
            rank, slot = s.route(op.stage, op.mb)
            assert rank == r and s.placement[r][slot] == op.stage, (op, r)
            if op.kind != "W":
                assert op.mb > last.get((op.kind, slot), -1), (op, r)
                last[op.kind, slot] = op.mb
            if not s.split_w and op.kind == "B":
                assert ops[i + 1] == Op("W", op.stage, op.mb)
    assert set(seen) == {Op(k, st, m) for k in "FBW" for st in range(s.n_stages)
                         for m in range(M)}
    res = simulate(s)                              # raises on a deadlock
    assert res.time > 0 and len(res.peak_inflight) == P


def test_placement_and_directions():
    v = make("dualpipev", 4, 8)
    assert v.n_stages == 8 and v.chunks == 2 and v.param_copies == 1
    assert v.placement == ((0, 7), (1, 6), (2, 5), (3, 4))
    d = make("dualpipe", 4, 8)
    assert d.n_stages == 4 and d.chunks == 2 and d.param_copies == 2
    assert d.placement == ((0, 3), (1, 2), (2, 1), (3, 0))
    assert [d.route(0, m) for m in (0, 3, 4, 7)] == [(0, 0), (0, 0), (3, 1), (3, 1)]
    assert d.route(3, 0) == (3, 0) and d.route(3, 4) == (0, 1)   # down: loss on rank 3
    assert d.ops[0][0] == Op("F", 0, 0) and d.ops[3][0] == Op("F", 0, 4)


def test_simulator_reports_deadlock_and_missing_ops():
    s = make("1f1b", 2, 2)
    swapped = list(s.ops[1])
    swapped[0], swapped[1] = swapped[1], swapped[0]            # B(1,0) before F(1,0)
    bad = s.__class__(**{**s.__dict__, "ops": (s.ops[0], tuple(swapped)),
                         "full_backward": ((), ())})
    with pytest.raises(ScheduleError, match=r"deadlock.*B\(1,0\)"):
        simulate(bad)
    short = s.__class__(**{**s.__dict__, "ops": (s.ops[0], s.ops[1][:-1])})
    with pytest.raises(ScheduleError, match=r"W\(1,1\) is missing"):
        simulate(short)


# Table 2 of the report (= DeepSeek's DualPipe README). PP counts stages: P for 1f1b/zb1p,
# 2P for dualpipev on P ranks; for dualpipe PP is the number of ranks (the README's "#Devices
# PP" for DualPipe vs "PP/2" for DualPipeV with the same PP stages). The formulas are exact when
# a forward costs what an input-backward costs (F = B - W, as in the report's figure) and W <= F,
# for any F&B between max(F, B) and F + B.
def table2(name, P, F, B, W, FB):
    if name == "1f1b":
        return (P - 1) * (F + B)
    if name == "zb1p":
        return (P - 1) * (F + B - 2 * W)
    PP = 2 * P if name == "dualpipev" else P
    return (PP / 2 - 1) * (FB + B - 3 * W)


COSTS = [(1.0, 2.0, 1.0, None), (1.0, 2.0, 1.0, 2.5), (1.3, 2.1, 0.8, None),
         (1.3, 2.1, 0.8, 2.9), (1.7, 2.2, 0.5, 2.6)]


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipev", "dualpipe"])
@pytest.mark.parametrize("PP", [4, 8, 16])
def test_table2_bubbles(name, PP):
    P = PP // 2 if name == "dualpipev" else PP   # ranks
    lo = min_microbatches(name, P)
    for M in (lo, lo + 2, 2 * lo + 4):
        s = make(name, P, M)
        for F, B, W, FB in COSTS:
            res = simulate(s, F, B, W, FB)
            expect = table2(name, P, F, B, W, F + B if FB is None else FB)
            assert res.bubble == pytest.approx(expect, abs=1e-9), (name, P, M, F, B, W, FB)
            assert res.bubble_fraction == pytest.approx(res.bubble / res.time)


def test_note_numbers_and_figure():
    # the research note's simulator numbers (F=1, input-backward 1, W=1: B=2, F&B=3)
    assert simulate(make("1f1b", 4, 16)).bubble == 9
    assert simulate(make("1f1b", 8, 32)).time == 117
    assert simulate(make("dualpipev", 4, 16)).bubble == 6
    r = simulate(make("dualpipev", 8, 32))
    assert (r.time, r.bubble) == (206, 14)
    # DeepSeek's README figure: DualPipeV, 4 ranks, 10 micro-batches, 66 cells
    assert simulate(make("dualpipev", 4, 10)).time == 66


def test_activations_and_parameter_copies():
    for P in (2, 4, 8):
        assert simulate(make("1f1b", P, 3 * P)).peak_inflight == tuple(P - s for s in range(P))
        assert simulate(make("zb1p", P, 3 * P)).peak_inflight == tuple(P - s for s in range(P))
        # DualPipeV: PP = 2P stage chunks, PP + 1 on the last rank (the report's PP+1)
        v = simulate(make("dualpipev", P, 3 * P))
        assert v.peak_inflight == (2 * P,) * (P - 1) + (2 * P + 1,)
        assert v.param_copies == 1
        # DualPipe: PP = P chunks, PP + 1 on the two middle ranks
        d = simulate(make("dualpipe", P, 2 * P + 2))
        assert max(d.peak_inflight) == P + 1
        assert [r for r, n in enumerate(d.peak_inflight) if n == P + 1] == [P // 2 - 1, P // 2]
        assert d.param_copies == 2
    assert simulate(make("1f1b", 4, 8)).param_copies == 1


def _ops(text):
    out = []
    for tok in text.split():
        out.append(Op(tok[0], int(tok[1]), int(tok[2])))
    return tuple(out)


def test_dualpipev_matches_deepseek_sections_p2():
    """Hand-derived from dualpipev.py step() with 2 ranks (stages 0,3 on rank 0; 1,2 on rank 1)
    and 4 micro-batches; Xsm = op X of stage s, micro-batch m."""
    s = make("dualpipev", 2, 4)
    rank0 = _ops(
        "F00 F01 "                        # 1 nF0: (P-r-1)*2 = 2
        "F02 F30 "                        # 2 nF0F1: r+1 = 1
        "B30 W30 F31 "                    # 3 nB1W1F1 (B deferred, W popped at once)
        "F03 B31 W31 F32 B00 W00 "        # 4 nF0B1F1B0: M-2P+r+1 = 1, both pairs overlapped
        "B32 W32 F33 B01 W01 "            # 5 nB1F1B0: 1
        "B33 W33 B02 "                    # 6 nB1B0: 1; zero bubble from B0 on (rank even)
        "W02 B03 "                        # 7 nWB0: 1
        "W03")                            # 8 nW: 1
    rank1 = _ops(
        "F10 F20 F11 F21 "                # 2 nF0F1: 2 (no nF0 on the last rank)
        "F12 B20 W20 F22 B10 W10 "        # 4: first F0/B1 not overlapped on the last rank
        "F13 B21 W21 F23 B11 W11 "
        "B22 W22 B12 W12 B23 B13 "        # 6 nB1B0: 2; zero bubble from i = 1 (rank odd)
        "W23 W13")                        # 8 nW: 2
    assert s.ops == (rank0, rank1)
    assert s.overlapped == (((7, 8), (10, 11), (15, 16)), ((7, 8), (10, 11), (13, 14)))


def test_dualpipev_sections_p4_rank_counts():
    """P=4, M=10 (DeepSeek's figure): section lengths and the figure's first ops per rank."""
    s = make("dualpipev", 4, 10)
    assert s.ops[0][:9] == _ops("F00 F01 F02 F03 F04 F05 F06 F70 B70")
    assert s.ops[2][:12] == _ops("F20 F21 F22 F50 F23 F51 F24 F52 B50 W50 F53 F25")
    assert s.ops[3][:12] == _ops("F30 F40 F31 F41 F32 F42 F33 F43 F34 B40 W40 F44")
    for r in range(4):   # overlapped pairs: 2*(M-2P+r+1) - [last rank] + (P-r-1)
        assert len(s.overlapped[r]) == 2 * (10 - 8 + r + 1) - (r == 3) + (4 - r - 1)


@pytest.mark.parametrize("name,P,M", [(n, P, M) for n, P, M in cases() if P in (2, 4, 8)])
def test_lockstep_packing(name, P, M):
    s = make(name, P, M)
    ticks = lockstep(s)
    T = ticks.table.shape[0]
    assert ticks.table.shape == (T, P, 3, 2) and ticks.table.dtype.name == "int32"
    tick_of = {}
    for t in range(T):
        for r in range(P):
            for row, kind in enumerate("FBW"):
                st, mb = (int(x) for x in ticks.table[t, r, row])
                if mb < 0:
                    assert st == -1
                    continue
                op = Op(kind, st, mb)
                assert op not in tick_of and s.route(st, mb)[0] == r
                tick_of[op] = t
    assert len(tick_of) == 3 * s.n_stages * M
    for op, t in tick_of.items():
        for d in deps(s, op):
            assert tick_of[d] < t or (op.kind == "W" and tick_of[d] == t), (op, d)
    # per rank the ticks follow the list order (each tick takes a prefix)
    for r, ops in enumerate(s.ops):
        assert [tick_of[op] for op in ops] == sorted(tick_of[op] for op in ops)
    # K: activations in flight per (rank, chunk) with F before B inside a tick; mb % K unique
    K, live = 0, {}
    for t in range(T):
        for r in range(P):
            for row, sign in ((0, 1), (1, -1)):
                st, mb = (int(x) for x in ticks.table[t, r, row])
                if mb >= 0:
                    key = (r, s.route(st, mb)[1])
                    live.setdefault(key, set())
                    if sign > 0:
                        assert all(m % ticks.slots != mb % ticks.slots for m in live[key])
                        live[key].add(mb)
                        K = max(K, len(live[key]))
                    else:
                        live[key].remove(mb)
    assert K == ticks.slots
    for F, B, W in ((1.0, 2.0, 1.0), (1.3, 2.1, 0.8)):
        a, b = simulate(s, F, B, W), simulate_lockstep(s, F, B, W)
        assert b.time >= a.time - 1e-9


def test_lockstep_close_to_mpmd():
    # P=8, M=32, F=1 B=2 W=1: eager 1F1B reaches the MPMD time; DualPipe(V) within a few units
    assert simulate_lockstep(make("1f1b", 8, 32, eager=True)).time == 117
    assert simulate_lockstep(make("dualpipev", 8, 32)).bubble <= 2 * 14
    assert simulate_lockstep(make("dualpipe", 8, 32)).bubble <= 2 * 6


@pytest.mark.parametrize("name,P,M,needle", [
    ("dualpipe", 3, 6, "even number of pipeline ranks"),
    ("dualpipe", 4, 6, r"micro-batches >= 2\*ranks"),
    ("dualpipe", 4, 9, "even number of micro-batches"),
    ("dualpipev", 4, 7, r"micro-batches >= 2\*ranks"),
    ("1f1b", 4, 3, "micro-batches >= ranks"),
    ("interleaved", 4, 8, "known: gpipe, 1f1b"),
    ("gpipe", 0, 8, "ranks must be >= 1"),
])
def test_invalid_input(name, P, M, needle):
    with pytest.raises(ScheduleError, match=needle):
        make(name, P, M)


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("DSV3_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "dsv3_jax.pipeline", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


def test_cli_draws_and_prints(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "schedule.png"
    r = run_cli("--schedule", "dualpipe", "--pp", 8, "--microbatches", 20, "--png", png)
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "bubble MPMD 6 " in r.stdout and "bubble lockstep" in r.stdout
    assert "parameter copies: 2" in r.stdout and "peak in-flight" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (("--schedule", "dualpipe", "--pp", 7, "--microbatches", 14), "even number of pipeline"),
    (("--schedule", "dualpipev", "--pp", 8, "--microbatches", 8), "micro-batches >= 2*ranks"),
    (("--schedule", "chimera", "--pp", 4), "unknown pipeline schedule"),
])
def test_cli_user_errors(args, needle):
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    errs = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errs) == 1 and needle in errs[0] and "Traceback" not in r.stderr, r.stderr
