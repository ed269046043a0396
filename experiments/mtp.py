"""RQ3, multi-token prediction (report §4.5.1 Table 4, §5.4.3): MTP depth 0 / 1 / 2, and its draft.

  python experiments/mtp.py --size full       # experiments/results/mtp/
  python experiments/mtp.py --size smoke      # seconds; a temporary directory

1. Training: the same main model (tiny preset), data, seeds and steps with
   model.num_nextn_predict_layers = 0, 1, 2 (equal main-model compute: the MTP modules only add
   work). Compared: the main head's validation loss (MTP discarded at evaluation, as the trainer's
   Evaluator does).
2. Acceptance: the trained D >= 1 models draft with their MTP modules in dsv3_jax.generate's
   lossless speculative decoding (greedy, batch 1, held-out library-code prompts); we keep the
   acceptance rate per draft depth, tokens per main forward, and plain vs speculative tokens/s.
3. Cost model: per-step decode time of main models of increasing depth (tiny width, D = 1,
   random weights: the time of a step does not depend on them) for plain and speculative decoding;
   a least-squares line t(L) = a + b L for each projects the step costs to the release's 61
   layers, and speed-up = (1 + acceptance) x t_plain / t_spec there, with our acceptance and the
   report's 85-90% (its claim: 1.8x tokens per second).
"""
from __future__ import annotations

import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np                                          # noqa: E402

from experiments import common                              # noqa: E402
from experiments import load_balancing as lb                # noqa: E402

QUESTION = "mtp"
DEPTHS = (0, 1, 2)
RELEASE_LAYERS = 61
REPORT_ACCEPTANCE = (0.85, 0.90)
REPORT_SPEEDUP = 1.8
SIZES = {
    "smoke": {"steps": 2, "seeds": [0], "seq_len": 64, "batch": 2, "layers": 2, "log_every": 1,
              "eval_every": 1, "eval_batches": 1, "domain_rows": 1, "prompts": 1,
              "prompt_len": 16, "new_tokens": 8, "cost_layers": [1, 2], "cost_new_tokens": 4,
              "cost_repeats": 1, "depths": [0, 1], "mtp_depth": 1, "moe_impl": "gather"},
    "full": {"steps": 600, "seeds": [0, 1, 2], "seq_len": 128, "batch": 8, "layers": 4,
             "log_every": 5, "eval_every": 150, "eval_batches": 4, "domain_rows": 8, "prompts": 8,
             "prompt_len": 32, "new_tokens": 48, "cost_layers": [4, 8, 16],
             "cost_new_tokens": 64, "cost_repeats": 3, "depths": list(DEPTHS), "mtp_depth": 1,
             "moe_impl": "auto"},
}


def make_config(depth: int, seed: int, s: dict):
    """The load-balancing experiment's run config (aux-free arm) with MTP depth `depth`."""
    c = lb.make_config("aux_free", seed, s)
    c.model.num_nextn_predict_layers = depth
    return c


def acceptance(cfg, variables, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy plain vs speculative decoding, batch 1, per prompt; identical outputs checked."""
    from dsv3_jax.generate import generate
    plain_t = spec_t = gen = 0.0
    steps = rows = 0
    accepted = np.zeros(cfg.num_nextn_predict_layers)
    same = True
    for i, p in enumerate(prompts):
        for rep in range(2 if i == 0 else 1):          # the first call of each compiles
            a = generate(cfg, variables, [p], new_tokens)
            b = generate(cfg, variables, [p], new_tokens, speculative=True)
        same &= a.tokens == b.tokens
        plain_t += a.stats["seconds"]
        spec_t += b.stats["seconds"]
        gen += b.stats["generated_tokens"]
        steps += b.stats["decode_steps"]
        rows += 1
        accepted += np.array(b.stats["acceptance_by_depth"]) * b.stats["decode_steps"]
    return {"identical_to_plain": bool(same),
            "acceptance_by_depth": (accepted / steps).tolist(),
            "acceptance_rate": float(accepted.sum() / (steps * cfg.num_nextn_predict_layers)),
            "tokens_per_forward": float((accepted.sum() + steps) / steps),
            "plain_tokens_per_s": gen / plain_t, "speculative_tokens_per_s": gen / spec_t,
            "speedup": plain_t / spec_t}


def step_costs(s: dict) -> dict:
    """Seconds per decode step (batch 1) of plain and speculative decoding vs main-model depth."""
    import jax
    from dsv3_jax import config, model
    from dsv3_jax.generate import generate
    out = {"layers": [], "plain_s": [], "spec_s": []}
    prompt = list(range(100, 100 + s["prompt_len"]))
    for layers in s["cost_layers"]:
        cfg = config.tiny(num_hidden_layers=layers, num_nextn_predict_layers=1)
        variables = model.init(cfg, jax.random.key(0))
        best = {}
        for spec in (False, True):
            generate(cfg, variables, [prompt], s["cost_new_tokens"], speculative=spec)  # compile
            t = []
            for _ in range(s["cost_repeats"]):
                g = generate(cfg, variables, [prompt], s["cost_new_tokens"], speculative=spec)
                t.append(g.stats["seconds"] / (g.stats["decode_steps"] + 1))  # + the prefill
            best[spec] = min(t)
        out["layers"].append(layers)
        out["plain_s"].append(best[False])
        out["spec_s"].append(best[True])
        print(f"   cost model: {layers} layers: plain {1e3 * best[False]:.2f} ms/step, "
              f"speculative {1e3 * best[True]:.2f} ms/step", flush=True)
    return out


def project(costs: dict, accept: float | None) -> dict:
    """Lines t = a + b L through the measured step costs; speed-ups at RELEASE_LAYERS."""
    L = np.array(costs["layers"], float)
    fit = {k: np.polyfit(L, np.array(costs[k]), 1).tolist() for k in ("plain_s", "spec_s")}
    at = lambda k, n: fit[k][0] * n + fit[k][1]
    rows = {}
    for n in sorted(set(costs["layers"]) | {RELEASE_LAYERS}):
        tp, tsp = at("plain_s", n), at("spec_s", n)
        row = {"plain_s": tp, "spec_s": tsp, "draft_share": (tsp - tp) / tsp}
        if accept is not None:
            row["speedup_our_acceptance"] = (1 + accept) * tp / tsp
        for r in REPORT_ACCEPTANCE:
            row[f"speedup_at_{int(100 * r)}pct"] = (1 + r) * tp / tsp
        rows[str(n)] = row
    return {"fit_slope_intercept": fit, "at_layers": rows}


def run_one(depth: int, seed: int, s: dict, d: pathlib.Path, workroot: pathlib.Path,
            prompts) -> dict:
    import shutil
    from dsv3_jax import ckpt, train
    key = {"depth": depth, "seed": seed, "size": s}
    out_path = d / "runs" / f"mtp{depth}_s{seed}.json"
    hit = common.cached(out_path, key)
    if hit is not None:
        print(f"== MTP depth {depth} seed {seed}: cached {out_path}", flush=True)
        return hit
    c = make_config(depth, seed, s)
    workdir = workroot / f"mtp{depth}_s{seed}"
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"== MTP depth {depth} seed {seed}: training {s['steps']} steps in {workdir}", flush=True)
    t = time.time()
    result = train.run(c, str(workdir))
    seconds = time.time() - t
    summary = {"config": key, "metrics": lb.read_metrics(workdir),
               "final_val_loss": result["val_loss"], "seconds": seconds,
               "trainer_config": c.to_dict()}
    if depth:
        cfg, variables = ckpt.load_variables(str(workdir))
        summary["acceptance"] = acceptance(cfg, variables, prompts, s["new_tokens"])
    (d / "runs").mkdir(parents=True, exist_ok=True)
    common.save(out_path, summary)
    return summary


def run(size: str = "full", results_dir=None, steps: int | None = None,
        seeds: list[int] | None = None) -> dict:
    d = pathlib.Path(results_dir or common.results_dir(QUESTION, size))
    s = dict(SIZES[size])
    if steps:
        s.update(steps=steps, eval_every=max(1, steps // 4))
    if seeds is not None:
        s["seeds"] = list(seeds)
    workroot = (ROOT / "runs" / QUESTION) if size == "full" else d / "work"
    code = lb.domain_batches(s["prompts"], s["prompt_len"])["library code"]
    prompts = [row.tolist() for row in code]
    t0 = time.time()
    runs = {depth: [run_one(depth, seed, s, d, workroot, prompts) for seed in s["seeds"]]
            for depth in s["depths"]}
    summary = {}
    for depth, per_seed in runs.items():
        row = {"final_val_loss": common.stat([r["final_val_loss"] for r in per_seed]),
               "train_seconds": common.stat([r["seconds"] for r in per_seed])}
        if depth:
            row["val_loss_minus_depth0"] = common.stat([r["final_val_loss"] - b["final_val_loss"]
                                                  for r, b in zip(per_seed, runs[0])])
            for k in ("acceptance_rate", "tokens_per_forward", "speedup"):
                row[k] = common.stat([r["acceptance"][k] for r in per_seed])
            row["acceptance_by_depth"] = np.mean([r["acceptance"]["acceptance_by_depth"]
                                                  for r in per_seed], 0).tolist()
            row["all_identical_to_plain"] = all(r["acceptance"]["identical_to_plain"]
                                                for r in per_seed)
        summary[depth] = row
    cost_path = d / "step_costs.json"
    cost_key = {k: s[k] for k in ("cost_layers", "cost_new_tokens", "cost_repeats", "prompt_len")}
    costs = common.cached(cost_path, cost_key)
    if costs is None:
        costs = {"config": cost_key, **step_costs(s)}
        common.save(cost_path, costs)
    accept1 = summary[1]["acceptance_rate"]["mean"]
    cmd = f"python experiments/mtp.py --size {size}"
    if steps:
        cmd += f" --steps {steps}"
    if seeds is not None:
        cmd += f" --seeds {','.join(map(str, seeds))}"
    out = {"config": {"size": size, "sizes": s, "depths": s["depths"]},
           "provenance": common.provenance(cmd), "seconds": time.time() - t0,
           "summary": {str(k): v for k, v in summary.items()},
           "step_costs": costs, "projection": project(costs, accept1),
           "report": {"acceptance": REPORT_ACCEPTANCE, "speedup": REPORT_SPEEDUP,
                      "layers": RELEASE_LAYERS},
           "runs": {str(k): v for k, v in runs.items()}}
    common.save(d / "results.json", out)
    return out


def report(out) -> str:
    """Markdown: main-head validation loss per depth, acceptance, the cost-model projection."""
    sm = out["summary"]
    n = len(out["config"]["sizes"]["seeds"])
    ms = lambda st, f="{:.4f}": f"{f.format(st['mean'])} ± {f.replace('+', '').format(st['std'])}"
    lines = ([] if out["config"]["size"] == "full" else
             ["*Smoke size: a check of the code path, not a result.*", ""])
    lines += [f"Mean ± sample std over {n} seed(s). Validation loss of the main head (MTP modules "
             "discarded); acceptance with greedy speculative decoding, batch 1.", "",
             "| MTP depth | validation loss | Δ vs depth 0 (paired) | acceptance | acceptance by "
             "draft depth | tokens per main forward | speculative / plain tokens/s | train s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for depth, row in sm.items():
        dd = row.get("val_loss_minus_depth0")
        lines.append(
            f"| {depth} | {ms(row['final_val_loss'])} | {ms(dd, '{:+.4f}') if dd else '—'} | "
            + (f"{ms(row['acceptance_rate'], '{:.3f}')} | "
               + ", ".join(f"{x:.3f}" for x in row["acceptance_by_depth"])
               + f" | {ms(row['tokens_per_forward'], '{:.3f}')} | {ms(row['speedup'], '{:.2f}')}x"
               if "acceptance_rate" in row else "— | — | — | —")
            + f" | {row['train_seconds']['mean']:.0f} |")
    d1 = np.array(sm["1"]["val_loss_minus_depth0"]["values"])
    v = common.verdict(d1)
    lines += ["", f"**Claim (MTP improves the main model): {v} at this scale** for depth 1 "
              f"(depth 1 minus depth 0: {d1.mean():+.4f}, per seed "
              f"{', '.join(f'{x:+.4f}' for x in d1)})."]
    if "2" in sm:
        d2 = np.array(sm["2"]["val_loss_minus_depth0"]["values"])
        lines[-1] += (f" Depth 2: {common.verdict(d2)} ({d2.mean():+.4f}; per seed "
                      f"{', '.join(f'{x:+.4f}' for x in d2)}).")
    identical = all(sm[k].get("all_identical_to_plain", True) for k in sm)
    lines[-1] += (" Speculative outputs identical to plain greedy on every prompt: "
                  f"{'yes' if identical else 'NO'}.")
    pj = out["projection"]["at_layers"]
    lines += ["", "| main layers (tiny width) | plain ms/step | speculative ms/step | overhead share "
              "| speed-up, our acceptance | at 85% | at 90% |", "|---|---|---|---|---|---|---|"]
    meas = dict(zip(map(str, out["step_costs"]["layers"]),
                    zip(out["step_costs"]["plain_s"], out["step_costs"]["spec_s"])))
    for L, row in pj.items():
        m = meas.get(L)
        src = (f"{1e3 * m[0]:.2f} (fit {1e3 * row['plain_s']:.2f}) | {1e3 * m[1]:.2f} (fit "
               f"{1e3 * row['spec_s']:.2f})") if m else (f"{1e3 * row['plain_s']:.2f} (projected) | "
                                                     f"{1e3 * row['spec_s']:.2f} (projected)")
        lines.append(f"| {L} | {src} | {100 * row['draft_share']:.0f}% | "
                     f"{row.get('speedup_our_acceptance', float('nan')):.2f}x | "
                     f"{row['speedup_at_85pct']:.2f}x | {row['speedup_at_90pct']:.2f}x |")
    p61 = pj[str(RELEASE_LAYERS)]
    fit = out["projection"]["fit_slope_intercept"]
    fit_ratio = fit["spec_s"][0] / fit["plain_s"][0]
    lines += ["", f"At the release's depth ({RELEASE_LAYERS} layers, one MTP block) the overhead is "
              f"{100 * p61['draft_share']:.0f}% of a speculative step by our cost model; with the "
              f"report's 85-90% acceptance that projects to {p61['speedup_at_85pct']:.2f}-"
              f"{p61['speedup_at_90pct']:.2f}x tokens/s (the report: {REPORT_SPEEDUP}x), with our "
              f"measured acceptance ({100 * sm['1']['acceptance_rate']['mean']:.0f}%) "
              f"{p61['speedup_our_acceptance']:.2f}x. Overhead share = (speculative - plain step) "
              "/ speculative step: the MTP block, the verify forward's extra token(s) and the "
              f"bookkeeping. Per layer, a speculative step costs {fit_ratio:.2f}x a plain one here "
              "(the verify forward reads 2 tokens; on CPU at batch 1 that is not free, on a GPU "
              "it nearly is), which caps the projection."]
    return "\n".join(lines)


def plot(out, size: str):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    ax = axes[0]
    for i, (depth, per_seed) in enumerate(out["runs"].items()):
        m0 = per_seed[0]["metrics"]
        ys = np.array([r["metrics"]["val_loss"] for r in per_seed])
        ax.plot(m0["val_step"], ys.mean(0), "o-", color=f"C{i}", label=f"MTP depth {depth}")
        if len(ys) > 1:
            sd = ys.std(0, ddof=1)
            ax.fill_between(m0["val_step"], ys.mean(0) - sd, ys.mean(0) + sd, color=f"C{i}",
                            alpha=0.2, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel("main-head validation loss")
    ax.set_title("MTP depth 0 / 1 / 2 (mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    c = out["step_costs"]
    fit = out["projection"]["fit_slope_intercept"]
    L = np.arange(1, RELEASE_LAYERS + 1)
    for k, lab, col in (("plain_s", "plain", "C0"), ("spec_s", "speculative (D=1)", "C1")):
        ax.plot(c["layers"], 1e3 * np.array(c[k]), "o", color=col, label=f"{lab}, measured")
        ax.plot(L, 1e3 * (fit[k][0] * L + fit[k][1]), "--", color=col, lw=0.8)
    ax.set_xlabel("main-model layers (tiny width)")
    ax.set_ylabel("ms per decode step (batch 1)")
    ax.set_title("decode step cost and its linear fit")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[2]
    tp, ts = fit["plain_s"][0] * L + fit["plain_s"][1], fit["spec_s"][0] * L + fit["spec_s"][1]
    acc = out["summary"]["1"]["acceptance_rate"]["mean"]
    for a, col, lab in ((acc, "C2", f"our acceptance {100 * acc:.0f}%"), (0.85, "C3", "85%"),
                        (0.90, "C4", "90%")):
        ax.plot(L, (1 + a) * tp / ts, color=col, label=lab)
    ax.axhline(REPORT_SPEEDUP, color="k", ls=":", lw=0.8, label="report: 1.8x")
    ax.axhline(1, color="k", lw=0.5)
    ax.axvline(RELEASE_LAYERS, color="grey", ls="--", lw=0.6)
    ax.set_xlabel("main-model layers")
    ax.set_ylabel("projected speculative speed-up")
    ax.set_title("speed-up = (1 + acceptance) x t_plain / t_spec")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig, common.savefig(fig, "mtp_ablation", size)


def main(argv=None):
    size, steps, seeds = common.parse_run_args(__doc__.splitlines()[0], argv)
    out = run(size, steps=steps, seeds=seeds)
    for depth, row in out["summary"].items():
        line = f"depth {depth}: val loss {common.mean_spread(row['final_val_loss']['values'])}"
        if "acceptance_rate" in row:
            line += (f", acceptance {common.mean_spread(row['acceptance_rate']['values'])}, "
                     f"speed-up {common.mean_spread(row['speedup']['values'])}")
        print(line)
    p61 = out["projection"]["at_layers"][str(RELEASE_LAYERS)]
    print(f"projected to {RELEASE_LAYERS} layers: draft share {100 * p61['draft_share']:.1f}%, "
          f"speed-up {p61.get('speedup_our_acceptance', float('nan')):.2f}x (our acceptance), "
          f"{p61['speedup_at_85pct']:.2f}-{p61['speedup_at_90pct']:.2f}x (85-90%)")


if __name__ == "__main__":
    main()
