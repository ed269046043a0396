"""GRPO reinforcement learning (report §5.2.2) on the trainer frame:

  python -m dsv3_jax.grpo --config experiments/configs/grpo_tiny.py \
      --config.train.init_from=runs/sft_tiny --workdir runs/grpo_tiny

Each step: P prompts from the task (its training split, seed grpo.seed), G samples each from the
current policy in one jitted rollout (`dsv3_jax.rollout`: temperature sampling, per-token
log-probabilities, stop at <|end|> / EOS or grpo.max_new_tokens), rewards (`dsv3_jax.rewards`),
group advantages, the frozen reference model's log-probabilities, then grpo.mu optimizer steps
of the `grpo` objective (eqs. 26-28) through `train.train_step`, the rollout's log-probabilities
serving as the "old" policy for all mu of them. The reference model is the init_from weights.
The router biases stay frozen unless balance.gamma > 0 (the config sets it to 0).

Metrics (metrics.jsonl, TensorBoard): reward mean/std, accuracy, frac_zero_std (groups with equal
rewards), kl, clip_frac, entropy, response length, rollout and update tokens/s, loss, grad norm.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import arithmetic, chat, sharding, train, writers
from dsv3_jax import ckpt as ckpt_lib
from dsv3_jax import rewards as rewards_lib
from dsv3_jax import train_state as ts
from dsv3_jax.config import ConfigError
from dsv3_jax.objectives import grpo as grpo_obj
from dsv3_jax.rollout import repeat, rollout


class _Position:
    """The GRPO run's data position (the step): prompts are a function of (seed, step)."""

    def __init__(self):
        self.step = 0

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state):
        self.step = int(state["step"])


def task_problems(c, step: int) -> list[dict]:
    g = c.grpo
    if g.task != "arithmetic":
        raise ConfigError(f"grpo.task: {g.task!r} is not a built-in task (arithmetic)")
    return arithmetic.problems(g.seed * 1_000_003 + step, g.prompts_per_step, "train")


def build_batch(prompts, r, advantages, width: int, mask_truncated: bool) -> dict:
    """Rows prompt + completion (right-padded to width + 1 tokens) as the trainer's batch, with
    the rollout's log-probabilities as old_logp at the completion targets."""
    n = len(prompts)
    seq = np.zeros((n, width + 1), np.int32)
    keep = np.zeros((n, width + 1), np.float32)
    old = np.zeros((n, width), np.float32)
    seg = np.zeros((n, width + 1), np.int32)
    for i, p in enumerate(prompts):
        m = int(r.lengths[i])
        seq[i, :len(p)] = p
        seq[i, len(p):len(p) + m] = r.tokens[i, :m]
        seg[i, :len(p) + m] = 1
        if r.finished[i] or not mask_truncated:
            keep[i, len(p):len(p) + m] = 1
        old[i, len(p) - 1:len(p) - 1 + m] = r.logps[i, :m]
    pos = np.broadcast_to(np.arange(width, dtype=np.int32), (n, width)) * (seg[:, :-1] > 0)
    return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "positions": pos.astype(np.int32),
            "segment_ids": seg[:, :-1], "loss_mask": keep[:, 1:], "old_logp": old,
            "ref_logp": old.copy(),
            "advantages": np.broadcast_to(np.asarray(advantages, np.float32)[:, None],
                                          (n, width)).copy()}


def run(c, workdir: str) -> dict:
    g = c.grpo
    if c.data.global_batch != g.prompts_per_step * g.group:
        raise ConfigError(f"data.global_batch ({c.data.global_batch}) must be grpo.prompts_per_"
                          f"step x grpo.group ({g.prompts_per_step * g.group})")
    s = train.set_up(c, workdir)
    tok = chat.chat_tokenizer(digits=chat.checkpoint_digits(c.train.init_from))
    if tok.get_vocab_size() > s.cfg.vocab_size:
        raise ConfigError(f"the chat tokenizer needs model.vocab_size >= {tok.get_vocab_size()}")
    position = _Position()
    rows = c.data.global_batch
    mb = c.data.micro_batch or rows
    info = {"grpo": True, "chat_digits": chat.digits_of(tok)}
    data = train.Data(ts.BatchSchedule(rows, mb, "", c.train.steps), position, [], tok, info,
                      micro_sharding=s.sharding(sharding.batch_spec(3, lead=1)),
                      row_sharding=s.sharding(sharding.batch_spec(2)))
    state, state_sharding, ckpt = train.restore_or_init(s, data)
    # the frozen reference: the init_from weights (also when resuming), else the initial state
    if c.train.init_from:
        _, ref = ckpt_lib.load_variables(os.path.expanduser(c.train.init_from))
        ref = {"params": ref["params"], "router_bias": ref.get("router_bias", {})}
        ref = jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype), ref,
                           {"params": state["params"], "router_bias": state["router_bias"]})
    else:
        ref = jax.tree.map(jnp.copy, {"params": state["params"],
                                      "router_bias": state["router_bias"]})
    with jax.set_mesh(s.mesh):
        step_fn = jax.jit(functools.partial(train.train_step, fns=s.fns),
                          in_shardings=(state_sharding, data.micro_sharding),
                          out_shardings=(state_sharding, s.sharding(jax.sharding.PartitionSpec())),
                          donate_argnums=0)
        ref_fn = jax.jit(grpo_obj.sequence_logps, static_argnums=(0, 3))
    reward_fn = rewards_lib.REWARDS[g.reward]()
    writer = writers.create(workdir, truncate_after=int(state["step"]))
    stops = (chat.END_ID, 1)
    width = -(-(max(len(chat.prompt_ids(tok, p["question"])) for p in task_problems(c, 0)) + 8
              + g.max_new_tokens) // 16) * 16
    start = int(state["step"])
    s.log(f"grpo: {c.train.steps} steps of {g.prompts_per_step} prompts x {g.group} samples, "
          f"mu={g.mu}, beta={g.beta}, eps={g.epsilon}, T={g.temperature}")
    history = []
    for step in range(start, c.train.steps):
        probs = task_problems(c, step)
        prompts = repeat([chat.prompt_ids(tok, p["question"]) for p in probs], g.group)
        problems = repeat(probs, g.group)
        variables = {"params": state["params"], "router_bias": state["router_bias"]}
        with jax.set_mesh(s.mesh):
            r = rollout(s.cfg, variables, prompts, g.max_new_tokens, temperature=g.temperature,
                        seed=c.train.seed * 1_000_003 + step, eos_id=None, stop_ids=stops)
        texts = [tok.decode(r.tokens[i, :int(r.lengths[i]) - int(r.finished[i])].tolist())
                 for i in range(rows)]
        rew = np.asarray(reward_fn([tok.decode(p) for p in prompts], texts, problems),
                         np.float32)
        adv = np.asarray(grpo_obj.group_advantages(jnp.asarray(rew), g.group))
        batch = build_batch(prompts, r, adv, width, g.mask_truncated)
        t0 = time.perf_counter()
        if g.beta:
            with jax.set_mesh(s.mesh):
                batch["ref_logp"] = np.asarray(ref_fn(s.cfg, ref, {k: jnp.asarray(batch[k]) for k
                                                                   in ("inputs", "targets",
                                                                       "positions",
                                                                       "segment_ids")},
                                                      g.temperature)[0])
        micro = {k: v.reshape((rows // mb, mb) + v.shape[1:]) for k, v in batch.items()}
        for _ in range(g.mu):
            with jax.set_mesh(s.mesh):
                state, metrics = step_fn(state, train.to_global(micro, data.micro_sharding, 1))
        m = train._scalars(jax.device_get(metrics))
        update_s = time.perf_counter() - t0
        grp = rew.reshape(-1, g.group)
        scalars = {"reward_mean": float(rew.mean()), "reward_std": float(rew.std()),
                   "accuracy": float((rew == 1).mean()),
                   "frac_zero_std": float((grp.std(-1) == 0).mean()),
                   "response_length": float(r.lengths.mean()),
                   "finished": float(r.finished.mean()),
                   "rollout_tokens_per_s": r.tokens_per_s,
                   "update_tokens_per_s": g.mu * batch["segment_ids"].astype(bool).sum()
                   / max(update_s, 1e-9), **m}
        writer.write_scalars(step + 1, scalars)
        history.append({"step": step + 1, **scalars})
        position.step = step + 1
        if (step + 1) % c.train.log_every == 0 or step == start:
            s.log(f"step {step + 1}: reward {scalars['reward_mean']:.3f} kl {m['kl']:.4f} "
                  f"clip {m['clip_frac']:.3f} len {scalars['response_length']:.1f} "
                  f"entropy {m['entropy']:.3f} rollout {r.tokens_per_s:,.0f} tok/s "
                  f"update {scalars['update_tokens_per_s']:,.0f} tok/s "
                  f"zero-std {scalars['frac_zero_std']:.2f}")
        if (step + 1) % c.train.checkpoint_every == 0 or step + 1 == c.train.steps:
            train._check_finite(state, ckpt)
            ckpt.save(step + 1, state, position.get_state(),
                      {"config": c.to_dict(), "data_info": data.info, "step": step + 1})
    ckpt.wait()
    writer.close()
    ckpt.close()
    result = {"step": int(state["step"]), "workdir": os.path.abspath(workdir),
              "last": history[-1] if history else None}
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    s.log(f"done: {workdir} (wall time {time.time() - s.t_start:.0f}s)")
    return result


main = train.cli_main(run)


if __name__ == "__main__":
    sys.exit(main())
