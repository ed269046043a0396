"""Our jitted train step vs Hugging Face transformers' DeepseekV3ForCausalLM + torch AdamW, on the
same config, batch and sequence length, measured side by side in one run (float32, 2 threads).

  python benchmarks/train_step_vs_hf.py [--steps 10 --threads 2]

Config (the issue's): vocab 8192, hidden 256, 4 layers with 1 dense, 16 routed experts top-4 in 4
groups keeping 2, 1 shared, MoE width 128, dense width 768, 4 heads, q_lora 96, kv_lora 64, nope
32, rope 16, v 32; batch 8 x 256 tokens. HF has no MTP training path, so ours runs with MTP off
for the comparison (and is also reported with MTP on, which does strictly more work).
"""
import argparse
import os
import time


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    return ap.parse_args()


ARGS = parse()
# Both frameworks get the same thread budget; set before either is imported.
os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true "
                                   f"intra_op_parallelism_threads={ARGS.threads}")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dsv3_jax import train, train_config, train_state  # noqa: E402
from step_config import SHAPES, our_config, random_batch  # noqa: E402


def time_ours(mtp: bool, batch):
    c = our_config(mtp)
    cfg = train_config.validate(c)
    fns = train.make_step_fns(c, cfg)
    state = train_state.init_state(cfg, fns.optimizer, 0, ema=False)
    step = jax.jit(lambda s, b: train.train_step(s, b, fns), donate_argnums=0)
    batch = {k: v[None] for k, v in batch.items()}          # one micro-batch
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for _ in range(ARGS.steps):
        state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    return (time.perf_counter() - t0) / ARGS.steps, float(m["loss"])


def time_hf(batch):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    torch.set_num_threads(ARGS.threads)
    torch.manual_seed(0)
    hf_cfg = DeepseekV3Config(**SHAPES, num_nextn_predict_layers=0, rope_interleave=True,
                              max_position_embeddings=2048, tie_word_embeddings=False)
    model = DeepseekV3ForCausalLM(hf_cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.from_numpy(np.concatenate([batch["inputs"], batch["targets"][:, -1:]], 1)).long()

    def one():
        out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    one()
    t0 = time.perf_counter()
    for _ in range(ARGS.steps):
        loss = one()
    return (time.perf_counter() - t0) / ARGS.steps, loss


def main():
    batch = random_batch(ARGS.batch, ARGS.seq)
    tokens = ARGS.batch * ARGS.seq
    print(f"jax {jax.__version__}, torch {torch.__version__}; {ARGS.threads} threads, float32, "
          f"batch {ARGS.batch}x{ARGS.seq}, mean of {ARGS.steps} steps after warm-up")
    t_hf, l_hf = time_hf(batch)
    t_ours, l_ours = time_ours(False, batch)
    t_mtp, _ = time_ours(True, batch)
    rows = [("HF transformers + torch AdamW", t_hf), ("dsv3_jax (MTP off, same model)", t_ours),
            ("dsv3_jax (MTP on, +1 MoE block)", t_mtp)]
    for name, t in rows:
        print(f"  {name:34s} {t * 1e3:8.1f} ms/step  {tokens / t:9.0f} tokens/s")
    print(f"ratio ours/HF tokens per second: {t_hf / t_ours:.2f}x (MTP on: {t_hf / t_mtp:.2f}x)")


if __name__ == "__main__":
    main()
