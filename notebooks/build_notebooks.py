"""Writes the four ablation notebooks (thin: every number comes from experiments/<question>.py).

  python notebooks/build_notebooks.py                 # (re)write the .ipynb sources, no outputs
  python notebooks/build_notebooks.py --execute       # and execute them in place (nbclient)

Executing uses DSV3_NOTEBOOK_SIZE as the notebooks do (unset: load the committed full results);
`DSV3_NOTEBOOK_SIZE=full python notebooks/build_notebooks.py --execute` reruns the experiments
(cached runs are reused). tests/test_notebooks.py executes them at smoke size.
"""
from __future__ import annotations

import argparse
import pathlib

import nbformat

HERE = pathlib.Path(__file__).resolve().parent

SETUP = """\
import os, pathlib, sys
ROOT = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]
            if (p / "experiments" / "common.py").exists())
sys.path.insert(0, str(ROOT))
import matplotlib.pyplot as plt
from IPython.display import Markdown, display
from experiments import common, {module}
SIZE, out = common.obtain({module}.QUESTION, {module}.run)
print(f"size: {{SIZE}}; results from {{out['provenance']['date']}}, commit "
      f"{{out['provenance']['git_commit']}}: {{out['provenance']['command']}}")"""

HOW = ("Size: `DSV3_NOTEBOOK_SIZE=smoke|full` (unset: the committed full results in "
       "`experiments/results/{q}/` are loaded, nothing retrains). Smoke runs write under "
       "`DSV3_RESULTS_DIR` (default: a temporary directory), never over the committed results. "
       "Regenerate: `{cmd}` then `python notebooks/build_notebooks.py --execute`.")


def show(fn: str) -> str:
    return (f"fig, saved = {fn}(out, SIZE)\n"
            "display(fig)\nplt.close(fig)\nprint('saved:', saved)")


NOTEBOOKS = {
    "cost": [
        ("md", "# Cost: the report's Table 1 and the KV cache per token (RQ1), from our counts\n"
               "**The report's claim (Table 1, §1):** pre-training 2664K + context extension 119K "
               "+ post-training 5K = **2788K H800 GPU-hours**, **$5.576M** at $2 per GPU-hour; "
               "180K GPU-hours per trillion tokens (3.7 days on 2048 H800s).\n\n"
               "Our FLOPs per token: `dsv3_jax.train_state.model_flops_per_token` = 6 x activated "
               "matmul parameters of the main model (from `dsv3_jax.params.count_params`; "
               "embedding lookup excluded, head included) + causal attention "
               "3 x 61 x 128 x (192 + 128) x seq_len; the MTP module's extra work is shown "
               "separately. H800 dense peaks: 989.4 TFLOP/s BF16, 1978.9 FP8 (the H100 SXM's "
               "compute). "
               + HOW.format(q="cost", cmd="python experiments/cost.py --size full")),
        ("code", SETUP.format(module="cost")),
        ("code", "display(Markdown(cost.report(out)))\n"
                 "checks = out['table1']['checks']\nassert all(checks.values()), checks\nchecks"),
        ("code", show("cost.plot")),
        ("md", "**Conclusion (2026-12-01, `python experiments/cost.py --size full`).** Table 1 "
               "reproduces to the report's rounding: 14.8T tokens x 180K GPU-hours per trillion "
               "= 2664K, + 119K + 5K = 2788K GPU-hours = $5.576M ($5.328M + $0.238M + $0.01M). "
               "Where the MFU comes from: the report's one stated rate (180K GPU-hours per "
               "trillion tokens) at our 2.505e11 FLOPs per token is 387 TFLOP/s per GPU, "
               "39.1% of the H800's dense BF16 peak (19.5% of FP8; 40.7% of BF16 counting the "
               "MTP module): a BF16-level MFU, plausible for FP8 GEMMs with the attention core, "
               "communication and pipeline bubbles at BF16 or idle. The context extension's "
               "126B tokens at 32K and 128K would need 75K GPU-hours at that MFU; the report's "
               "119K imply 24.8%. Post-training's token counts are not stated (5K hours = 27.8B "
               "tokens at the pre-training rate). KV cache per token at the release's dims, "
               "BF16: MLA 68.6 KiB (576 values per layer) vs MHA 4880 KiB (71x) vs GQA with 8 "
               "groups 305 KiB (4.4x)."),
    ],
    "fp8_vs_bf16": [
        ("md", "# FP8 vs BF16 training (RQ4; report §3.3, Figure 10)\n"
               "**The report's claim:** FP8 mixed-precision training stays within **0.25%** "
               "relative loss error of BF16 (validated at ~16B and ~230B parameters).\n\n"
               "The experiment (`experiments/fp8_vs_bf16.py`, config "
               "`experiments/configs/fp8_vs_bf16.py`): the tiny model, same init and batches, "
               "600 steps of 8 x 128 tokens at peak LR 1e-3, once in BF16 and once with the FP8 "
               "recipe (`model.fp8=True`: jnp emulation of the E4M3 GEMMs with 1x128 / 128x128 "
               "scales, FP8 activation caching and FP8 dispatch), for init seeds 0, 1 and 2; on "
               "seed 0 also the yardsticks (BF16 from another init, FP32 compute), which show "
               "what a change of rounding or init alone does to the same comparison. "
               + HOW.format(q="fp8_vs_bf16", cmd="python experiments/fp8_vs_bf16.py")),
        ("code", SETUP.format(module="fp8_vs_bf16")),
        ("code", "display(Markdown(fp8_vs_bf16.report(out)))"),
        ("code", show("fp8_vs_bf16.plot_results")),
        ("code", "# every seed stored so far (other seeds run with --seeds ... --no-noise)\n"
                 "if SIZE == \"full\":\n"
                 "    display(Markdown(fp8_vs_bf16.pool_report(fp8_vs_bf16.pool(save=False))))"),
        ("md", "**Conclusion (FP8_DATE, `python experiments/fp8_vs_bf16.py`).** "
               "FP8_CONCLUSION"),
    ],
    "load_balancing": [
        ("md", "# Load balancing (RQ2; report §4.5.2-4.5.3, Table 5, Figures 9-10)\n"
               "**The report's claims:** the auxiliary-loss-free strategy (a selection bias "
               "updated from the batch's loads, plus a tiny sequence-wise loss) reaches a better "
               "validation loss than a purely auxiliary-loss-based baseline at comparable "
               "balance (1B MoE: 2.253 vs 2.258 sequence-wise aux loss; a batch-wise aux loss "
               "also gives 2.253), and shows more expert specialisation across domains "
               "(Figure 9).\n\n"
               "Arms (same tiny model, data and seeds; `experiments/load_balancing.py`): "
               "**aux-free** (bias speed γ = 0.6 / steps: the report's 0.001 at 600 steps, 0.004 "
               "at this run's 150; α = 1e-4 sequence-wise), **aux loss** (no bias, "
               "sequence-wise loss α = 0.01), **batch-wise aux loss** (no bias, "
               "`balance.loss=\"batch\"`, α = 0.01), **none**. Domains for Figure 9's analysis: "
               "held-out stdlib library code, CPython's tests (excluded from the corpus) and "
               "the held-out files' docstrings. "
               + HOW.format(q="load_balancing",
                            cmd="python experiments/load_balancing.py --size full")),
        ("code", SETUP.format(module="load_balancing")),
        ("code", "display(Markdown(load_balancing.report(out)))"),
        ("code", show("load_balancing.plot_curves")),
        ("code", show("load_balancing.plot_heatmaps")),
        ("code", show("load_balancing.plot_domains")),
        ("md", "**Conclusion (2026-12-01).** LB_CONCLUSION"),
    ],
    "mtp": [
        ("md", "# Multi-token prediction (RQ3; report §4.5.1 Table 4, §5.4.3)\n"
               "**The report's claims:** training with MTP improves the main model (Table 4, "
               "at ~16B and ~229B; the MTP module is discarded at evaluation); as a "
               "speculative-decoding draft the second token is accepted 85-90% of the time, "
               "giving ~1.8x tokens per second.\n\n"
               "Arms (`experiments/mtp.py`): MTP depth 0 / 1 / 2 on the same main model, data, "
               "seeds and steps (equal main-model compute). Acceptance from "
               "`dsv3_jax.generate`'s lossless speculative decoding of the trained models; the "
               "cost model from decode-step times of main models of 4, 8 and 16 layers at tiny "
               "width, projected to the release's 61. "
               + HOW.format(q="mtp", cmd="python experiments/mtp.py --size full")),
        ("code", SETUP.format(module="mtp")),
        ("code", "display(Markdown(mtp.report(out)))"),
        ("code", show("mtp.plot")),
        ("md", "**Conclusion (2026-12-01).** MTP_CONCLUSION"),
    ],
}


def build(name: str, cells, conclusions: dict | None = None) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata.language_info = {"name": "python"}
    for kind, src in cells:
        for key, text in (conclusions or {}).items():
            src = src.replace(key, text)
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md"
                        else nbformat.v4.new_code_cell(src))
    return nb


def execute(path: pathlib.Path, timeout: int = 3600) -> nbformat.NotebookNode:
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--execute", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated notebook names")
    args = p.parse_args(argv)
    conclusions_path = HERE / "conclusions.json"
    import json
    conclusions = json.loads(conclusions_path.read_text()) if conclusions_path.exists() else {}
    for name, cells in NOTEBOOKS.items():
        if args.only and name not in args.only.split(","):
            continue
        path = HERE / f"{name}.ipynb"
        nbformat.write(build(name, cells, conclusions), path)
        if args.execute:
            nbformat.write(execute(path), path)
        print(f"wrote {path}{' (executed)' if args.execute else ''}")


if __name__ == "__main__":
    main()
