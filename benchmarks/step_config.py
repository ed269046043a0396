"""The train-step benchmarks' shared setup (train_step_vs_hf.py, train_step_ab.py): the issue's
model shapes on the tiny experiment config, and a random batch. Imports no jax itself, so a
script can set XLA_FLAGS before importing it."""
import numpy as np

from experiments.configs import tiny

# vocab 8192, hidden 256, 4 layers with 1 dense, 16 routed experts top-4 in 4 groups keeping 2,
# 1 shared, MoE width 128, dense width 768, 4 heads, q_lora 96, kv_lora 64, nope 32, rope 16, v 32
SHAPES = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
              num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=16,
              num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
              num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64,
              qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)


def our_config(mtp: bool = False):
    """experiments/configs/tiny.py (its speed knobs included) with the issue's shapes."""
    c = tiny.get_config()
    c.model.update(SHAPES)
    c.model.num_nextn_predict_layers = 1 if mtp else 0
    return c


def random_batch(batch: int = 8, seq: int = 256, seed: int = 0) -> dict:
    """One unpacked batch of random token ids (numpy), as the trainer's data pipeline gives."""
    ids = np.random.default_rng(seed).integers(2, 8192, (batch, seq + 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:],
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "segment_ids": np.ones((batch, seq), np.int32),
            "loss_mask": np.ones((batch, seq), np.float32)}
