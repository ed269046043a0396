"""The report's Table 1 (training cost) and the KV cache per token (RQ1), from our own counts.

  python experiments/cost.py [--size full|smoke]      # writes experiments/results/cost/results.json

Pure arithmetic on abstract shapes (dsv3_jax.params / train_state.model_flops_per_token /
kv_cache): seconds on one core, so smoke and full are the same computation.

Table 1 (report p. 5): pre-training 2664K + context extension 119K + post-training 5K = 2788K
H800 GPU-hours; $5.576M at $2 per GPU-hour. The report states one rate, 180K GPU-hours per
trillion tokens of pre-training (14.8T tokens -> 2664K). With our FLOPs per token that rate is a
sustained FLOP/s per GPU, hence an MFU against the H800's dense peak; the same MFU applied to the
context-extension stages' tokens (1000 steps of 1920 x 32K, then 1000 of 480 x 128K, §4.3)
predicts their hours, and the report's 119K gives their implied MFU. Post-training's tokens are
not stated; we give the tokens its 5K hours would buy at the pre-training rate.

FLOPs per token (train_state.model_flops_per_token): 6 x activated matmul parameters of the main
model (embedding lookup and router biases excluded; head included) + causal attention
3 x layers x heads x (qk_head_dim + v_head_dim) x seq_len. The MTP module (one per token in
pre-training) is reported separately (`mtp_flops_per_token`).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments import common                              # noqa: E402

QUESTION = "cost"

# H800 SXM dense tensor-core peaks (no sparsity), FLOP/s: the H100 SXM's compute (NVIDIA's
# datasheet: 989.4 TFLOP/s BF16, 1978.9 FP8); the H800 differs in interconnect only.
H800_PEAK = {"bf16": 989.4e12, "fp8": 1978.9e12}
PRICE_PER_GPU_HOUR = 2.0
REPORT_HOURS = {"pre_training": 2664e3, "context_extension": 119e3, "post_training": 5e3}
REPORT_TOTAL_HOURS = 2788e3
REPORT_USD = {"pre_training": 5.328e6, "context_extension": 0.238e6, "post_training": 0.01e6,
              "total": 5.576e6}
HOURS_PER_TRILLION = 180e3          # report §1: pre-training GPU-hours per 1e12 tokens
PRETRAIN_TOKENS = 14.8e12
# Context extension (report §4.3): two phases of 1000 steps each
CONTEXT_PHASES = [{"name": "32K", "seq_len": 32 * 1024, "batch": 1920, "steps": 1000},
                  {"name": "128K", "seq_len": 128 * 1024, "batch": 480, "steps": 1000}]
GPUS = 2048


def flops_per_token(cfg, seq_len: int) -> dict:
    from dsv3_jax import params, train_state
    main = train_state.model_flops_per_token(cfg, seq_len)
    counts = params.count_params(cfg)
    # one MTP module: its activated parameters + the shared head applied once more + its attention
    mtp = (6.0 * (counts["mtp_activated"] + cfg.hidden_size * cfg.vocab_size)
           + 3.0 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
           ) * cfg.num_nextn_predict_layers
    return {"main": main, "mtp": mtp}


def table1(cfg) -> dict:
    """Rows per stage: tokens, FLOPs, the report's hours, implied sustained FLOP/s and MFU."""
    pre = flops_per_token(cfg, 4096)
    # the one stated rate -> FLOP/s per GPU -> MFU
    seconds_per_token = HOURS_PER_TRILLION * 3600 / 1e12          # GPU-seconds per token
    rate = pre["main"] / seconds_per_token                          # FLOP/s per GPU
    rows = {}

    def row(name, tokens, fpt, report_hours, note):
        flops = tokens * fpt["main"]
        r = {"tokens": tokens, "flops_per_token": fpt["main"], "mtp_flops_per_token": fpt["mtp"],
             "flops": flops, "report_hours": report_hours, "note": note}
        if tokens:
            r["hours_at_pretraining_mfu"] = flops / rate / 3600
            if report_hours:
                sustained = flops / (report_hours * 3600)
                r["sustained_tflops_per_gpu"] = sustained / 1e12
                r["mfu_bf16_peak"] = sustained / H800_PEAK["bf16"]
                r["mfu_fp8_peak"] = sustained / H800_PEAK["fp8"]
                r["mfu_bf16_peak_with_mtp"] = (tokens * (fpt["main"] + fpt["mtp"])
                                               / (report_hours * 3600) / H800_PEAK["bf16"])
        rows[name] = r

    row("pre_training", PRETRAIN_TOKENS, pre, REPORT_HOURS["pre_training"],
        "14.8T tokens at 4K context; 180K GPU-hours per trillion tokens")
    for ph in CONTEXT_PHASES:
        tokens = ph["steps"] * ph["batch"] * ph["seq_len"]
        row(f"context_{ph['name']}", tokens, flops_per_token(cfg, ph["seq_len"]), None,
            f"{ph['steps']} steps x {ph['batch']} x {ph['seq_len']} tokens")
    ext = [rows["context_32K"], rows["context_128K"]]
    tokens = sum(r["tokens"] for r in ext)
    flops = sum(r["flops"] for r in ext)
    sustained = flops / (REPORT_HOURS["context_extension"] * 3600)
    rows["context_extension"] = {
        "tokens": tokens, "flops": flops, "report_hours": REPORT_HOURS["context_extension"],
        "hours_at_pretraining_mfu": flops / rate / 3600,
        "sustained_tflops_per_gpu": sustained / 1e12,
        "mfu_bf16_peak": sustained / H800_PEAK["bf16"], "mfu_fp8_peak": sustained / H800_PEAK["fp8"],
        "note": "both phases; the report gives one figure for the two"}
    rows["post_training"] = {
        "tokens": None, "report_hours": REPORT_HOURS["post_training"],
        "tokens_at_pretraining_rate": REPORT_HOURS["post_training"] * 3600 * rate / pre["main"],
        "note": "SFT (1.5M instances, 2 epochs) + RL: token counts not stated"}
    hours = {k: HOURS_PER_TRILLION * PRETRAIN_TOKENS / 1e12 if k == "pre_training"
             else REPORT_HOURS[k] for k in REPORT_HOURS}
    total = sum(hours.values())
    usd = {k: v * PRICE_PER_GPU_HOUR for k, v in hours.items()}
    return {
        "rows": rows,
        "hours": hours, "total_hours": total, "usd": usd, "total_usd": sum(usd.values()),
        "checks": {
            "pre_training_hours_equal_report": hours["pre_training"] == REPORT_HOURS["pre_training"],
            "total_hours_equal_report": total == REPORT_TOTAL_HOURS,
            "usd_equal_report": all(abs(usd[k] - REPORT_USD[k]) < 1 for k in usd)
            and abs(sum(usd.values()) - REPORT_USD["total"]) < 1},
        "pretraining_rate": {
            "gpu_seconds_per_token": seconds_per_token, "sustained_tflops_per_gpu": rate / 1e12,
            "mfu_bf16_peak": rate / H800_PEAK["bf16"], "mfu_fp8_peak": rate / H800_PEAK["fp8"],
            "days_on_2048_gpus_per_trillion": HOURS_PER_TRILLION / GPUS / 24,
            "days_on_2048_gpus_pretraining": hours["pre_training"] / GPUS / 24},
        "peaks_tflops": {k: v / 1e12 for k, v in H800_PEAK.items()},
    }


def kv_cache_per_token(cfg, bytes_per_value: int = 2, gqa_groups: int = 8) -> dict:
    """Bytes per token (all layers, BF16) of MLA's latent cache vs MHA and GQA at the release's
    attention dims (keys qk_head_dim = 128 + 64 wide, values v_head_dim = 128)."""
    from dsv3_jax import kv_cache
    layers = cfg.num_hidden_layers
    mla = kv_cache.latent_bytes(cfg, 1, 1, dtype="bfloat16")
    mha = layers * kv_cache.mha_values_per_token_per_layer(cfg) * bytes_per_value
    gqa = layers * gqa_groups * (cfg.qk_head_dim + cfg.v_head_dim) * bytes_per_value
    per_layer = {"MLA": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                 "MHA": kv_cache.mha_values_per_token_per_layer(cfg),
                 f"GQA ({gqa_groups} groups)": gqa_groups * (cfg.qk_head_dim + cfg.v_head_dim)}
    out = {"layers": layers, "bytes_per_value": bytes_per_value,
           "values_per_token_per_layer": per_layer,
           "bytes_per_token": {"MLA": mla, "MHA": mha, f"GQA ({gqa_groups} groups)": gqa}}
    out["ratio_to_mla"] = {k: v / mla for k, v in out["bytes_per_token"].items()}
    out["gib_at_128k_context"] = {k: v * 128 * 1024 / 2 ** 30
                                  for k, v in out["bytes_per_token"].items()}
    return out


def run(size: str = "full", results_dir=None) -> dict:
    from dsv3_jax import config
    d = results_dir or common.results_dir(QUESTION, size)
    cfg = config.deepseek_v3_671b()
    out = {"config": {"preset": "deepseek_v3_671b", "size": size},
           "provenance": common.provenance(f"python experiments/cost.py --size {size}"),
           "table1": table1(cfg), "kv_cache": kv_cache_per_token(cfg)}
    common.save(d / "results.json", out)
    return out


def report(out) -> str:
    """Markdown: Table 1 reproduced, the implied MFU per stage, the KV cache per token."""
    t, kv = out["table1"], out["kv_cache"]
    r = t["rows"]
    pr = t["pretraining_rate"]
    lines = ["| stage | tokens | FLOPs/token (ours) | report GPU-hours | our hours at the "
             "pre-training MFU | implied TFLOP/s per GPU | MFU (BF16 peak) | MFU (FP8 peak) | "
             "USD at $2 |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x, f: "—" if x is None else f.format(x)
    for name, label in (("pre_training", "pre-training (4K)"),
                        ("context_32K", "  context ext. 32K"), ("context_128K", "  context ext. 128K"),
                        ("context_extension", "context extension"),
                        ("post_training", "post-training")):
        row = r[name]
        usd = t["usd"].get(name)
        lines.append("| " + " | ".join([
            label, fmt(row.get("tokens"), "{:.4g}"), fmt(row.get("flops_per_token"), "{:.4g}"),
            fmt(row.get("report_hours"), "{:,.0f}"),
            fmt(row.get("hours_at_pretraining_mfu"), "{:,.0f}"),
            fmt(row.get("sustained_tflops_per_gpu"), "{:.0f}"),
            fmt(row.get("mfu_bf16_peak") and 100 * row["mfu_bf16_peak"], "{:.1f}%"),
            fmt(row.get("mfu_fp8_peak") and 100 * row["mfu_fp8_peak"], "{:.1f}%"),
            fmt(usd and usd / 1e6, "${:.3f}M")]) + " |")
    lines.append(f"| **total** | | | **{t['total_hours']:,.0f}** | | | | | "
                 f"**${t['total_usd'] / 1e6:.3f}M** |")
    lines += ["", f"The one stated rate, 180K GPU-hours per trillion tokens, is "
              f"{1e6 * pr['gpu_seconds_per_token']:.0f} GPU-µs per token; at our "
              f"{r['pre_training']['flops_per_token']:.4g} FLOPs per token that is "
              f"**{pr['sustained_tflops_per_gpu']:.0f} TFLOP/s per GPU**, an MFU of "
              f"**{100 * pr['mfu_bf16_peak']:.1f}%** of the H800's dense BF16 peak "
              f"({t['peaks_tflops']['bf16']:.1f} TFLOP/s) or {100 * pr['mfu_fp8_peak']:.1f}% of its "
              f"FP8 peak ({t['peaks_tflops']['fp8']:.1f}); with the MTP module's work counted, "
              f"{100 * r['pre_training']['mfu_bf16_peak_with_mtp']:.1f}% of BF16. "
              f"{pr['days_on_2048_gpus_per_trillion']:.2f} days per trillion tokens on 2048 GPUs "
              f"(the report: 3.7), {pr['days_on_2048_gpus_pretraining']:.1f} days for 14.8T.",
              "",
              f"Context extension at the pre-training MFU would take "
              f"{r['context_extension']['hours_at_pretraining_mfu'] / 1e3:.1f}K GPU-hours; the "
              f"report's 119K imply {100 * r['context_extension']['mfu_bf16_peak']:.1f}% (BF16 "
              f"peak) for those 126B tokens at 32K-128K. Post-training's 5K GPU-hours would buy "
              f"{r['post_training']['tokens_at_pretraining_rate'] / 1e9:.1f}B tokens at the "
              f"pre-training rate (its token counts are not stated).", "",
              "| KV cache (BF16, 61 layers) | values per token per layer | bytes per token | "
              "x MLA | GiB per 128K-token sequence |", "|---|---|---|---|---|"]
    for k, v in kv["bytes_per_token"].items():
        lines.append(f"| {k} | {kv['values_per_token_per_layer'][k]:,} | {v:,} "
                     f"({v / 1024:.1f} KiB) | {kv['ratio_to_mla'][k]:.1f} | "
                     f"{kv['gib_at_128k_context'][k]:.1f} |")
    return "\n".join(lines)


def plot(out, size: str):
    import matplotlib.pyplot as plt
    t, kv = out["table1"], out["kv_cache"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    stages = ["pre_training", "context_extension", "post_training"]
    x = np.arange(len(stages))
    rep = [t["rows"][k]["report_hours"] / 1e3 for k in stages]
    ours = [t["rows"][k].get("hours_at_pretraining_mfu", np.nan) / 1e3 for k in stages]
    ax.bar(x - 0.2, rep, 0.4, label="report (Table 1)")
    ax.bar(x + 0.2, ours, 0.4, label="our FLOPs at the pre-training MFU")
    for i, v in enumerate(rep):
        ax.text(i - 0.2, v, f"{v:,.0f}K", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(x, ["pre-training\n14.8T tokens", "context ext.\n32K + 128K",
                      "post-training\n(tokens n/a)"])
    ax.set_ylabel("H800 GPU-hours (thousands)")
    ax.set_title(f"Table 1: {t['total_hours'] / 1e3:,.0f}K GPU-hours, ${t['total_usd'] / 1e6:.3f}M")
    ax.legend(fontsize=8)
    names = list(kv["bytes_per_token"])
    vals = [kv["bytes_per_token"][k] / 1024 for k in names]
    ax2.bar(names, vals, color=["C2", "C3", "C1"])
    for i, v in enumerate(vals):
        ax2.text(i, v, f"{v:,.1f} KiB", ha="center", va="bottom", fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("KV cache per token (KiB, BF16)")
    ax2.set_title("KV cache per token at the release's dims")
    fig.tight_layout()
    return fig, common.savefig(fig, "cost_table1_kv_cache", size)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="full", choices=common.SIZES)
    args = p.parse_args(argv)
    out = run(args.size)
    t = out["table1"]
    for k, v in t["hours"].items():
        print(f"{k:20s} {v / 1e3:8.1f}K GPU-hours  ${t['usd'][k] / 1e6:.3f}M")
    print(f"{'total':20s} {t['total_hours'] / 1e3:8.1f}K GPU-hours  ${t['total_usd'] / 1e6:.3f}M")
    r = t["pretraining_rate"]
    print(f"pre-training: {r['sustained_tflops_per_gpu']:.0f} TFLOP/s per GPU = MFU "
          f"{100 * r['mfu_bf16_peak']:.1f}% of BF16 peak ({100 * r['mfu_fp8_peak']:.1f}% of FP8)")
    for k, v in out["kv_cache"]["bytes_per_token"].items():
        print(f"KV cache per token {k:16s} {v / 1024:8.1f} KiB")


if __name__ == "__main__":
    main()
