"""Group Relative Policy Optimization (report §5.2.2, eqs. 26-28): the loss and the advantages.

For each question q, G outputs o_1..o_G are sampled from the old policy; with rewards r_i

  A_i   = (r_i - mean(r)) / (std(r) + eps_std)                                       (28)
  ρ_i,t = π_θ(o_i,t | q, o_i,<t) / π_old(o_i,t | q, o_i,<t)
  KL_i,t = π_ref/π_θ - log(π_ref/π_θ) - 1       (per token, the unbiased "k3" estimator) (27)
  J     = mean_groups mean_i 1/|o_i| Σ_t [ min(ρ A_i, clip(ρ, 1-ε, 1+ε) A_i) - β KL_i,t ]  (26)

and the loss is -J. The report writes ratio and KL over whole outputs; like DeepSeekMath, TRL
(loss_type="grpo") and Tunix ("sequence-mean-token-mean"), they are taken per token and averaged
per output, then over outputs (every group has G outputs, so that is the mean over groups of
the mean over its outputs). std is the sample standard deviation (ddof=1, as TRL and Tunix);
eps_std = 1e-4 (TRL's) keeps a group with equal rewards at A = 0 rather than NaN.

The objective (for `train.train_step`) reads a batch of packed rows prompt + completion:
  inputs, targets, positions, segment_ids [rows, T]    as for pre-training
  loss_mask [rows, T]     1 where the target is a completion token (its EOS included)
  old_logp, ref_logp [rows, T]   log-probabilities of the targets under π_old and π_ref
  advantages [rows, T] (each row's A_i on every position; [rows] also accepted)
Log-probabilities are those of logits / temperature (the sampling distribution: no top-k/top-p).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv3_jax import model
from dsv3_jax.config import ModelConfig
from dsv3_jax.objectives.pretrain import eval_step

STD_EPS = 1e-4


def group_advantages(rewards_N: jax.Array, group: int, eps: float = STD_EPS,
                     scale: bool = True) -> jax.Array:
    """Eq. 28 over consecutive groups of `group` rewards: (r - mean) / (std_ddof1 + eps);
    scale=False only centres (Dr. GRPO)."""
    if group < 2:
        raise ValueError(f"GRPO needs at least 2 outputs per group, got {group}")
    r = rewards_N.astype(jnp.float32).reshape(-1, group)
    centred = r - r.mean(-1, keepdims=True)
    if scale:
        std = jnp.sqrt((centred ** 2).sum(-1, keepdims=True) / (group - 1))
        centred = centred / (std + eps)
    return centred.reshape(-1)


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token π_ref/π - log(π_ref/π) - 1 (≥ 0); the log-ratio is clamped at ±20 against
    overflow when the policy drifts far (Tunix's kl clamp)."""
    d = jnp.clip(ref_logp - logp, -20.0, 20.0)
    return jnp.exp(d) - d - 1.0


def grpo_token_loss(logp, old_logp, ref_logp, advantages, mask, *, epsilon: float,
                    beta: float, epsilon_high: float | None = None):
    """-J of eq. 26 for rows of per-token log-probabilities [N, T] with mask [N, T] and
    advantages [N]; returns (loss, aux: kl, clip_frac, ratio_mean)."""
    eps_hi = epsilon if epsilon_high is None else epsilon_high
    mask = mask.astype(jnp.float32)
    ratio = jnp.exp(logp - old_logp)
    a = advantages if advantages.ndim == 2 else advantages[:, None]   # per row or per token
    unclipped = ratio * a
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + eps_hi) * a
    surrogate = jnp.minimum(unclipped, clipped)
    kl = k3_kl(logp, ref_logp)
    per_token = surrogate - beta * kl
    n_tok = jnp.maximum(mask.sum(-1), 1.0)
    per_output = (per_token * mask).sum(-1) / n_tok
    loss = -per_output.mean()
    total = jnp.maximum(mask.sum(), 1.0)
    aux = {"kl": jax.lax.stop_gradient((kl * mask).sum(-1) / n_tok).mean(),
           "clip_frac": jax.lax.stop_gradient(((clipped < unclipped) * mask).sum() / total),
           "ratio_mean": jax.lax.stop_gradient((ratio * mask).sum() / total)}
    return loss, aux


def target_logps(logits_BTV: jax.Array, targets_BT: jax.Array, temperature: float):
    """(log-probability of each target under softmax(logits / T), entropy of that softmax)."""
    logits = logits_BTV.astype(jnp.float32) / (temperature or 1.0)
    logz = jax.nn.logsumexp(logits, -1)
    logp = jnp.take_along_axis(logits, targets_BT[..., None], -1)[..., 0] - logz
    p = jax.nn.softmax(logits, -1)
    entropy = logz - (p * logits).sum(-1)
    return logp, entropy


def sequence_logps(cfg: ModelConfig, variables: dict, batch: dict, temperature: float):
    """Teacher-forced log-probabilities of batch['targets'] [rows, T] (and the forward's loads)."""
    out = model.forward(cfg, variables, batch["inputs"], positions=batch["positions"],
                        segment_ids=batch["segment_ids"], with_mtp=False)
    logp, entropy = target_logps(out.logits, batch["targets"], temperature)
    return logp, entropy, out


@dataclasses.dataclass(frozen=True)
class GRPO:
    cfg: ModelConfig
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.04
    temperature: float = 1.0

    def loss(self, params, router_bias, batch, step):
        logp, entropy, out = sequence_logps(self.cfg, {"params": params,
                                                       "router_bias": router_bias},
                                            batch, self.temperature)
        loss, aux = grpo_token_loss(logp, batch["old_logp"], batch["ref_logp"],
                                    batch["advantages"], batch["loss_mask"],
                                    epsilon=self.epsilon, beta=self.beta,
                                    epsilon_high=self.epsilon_high)
        mask = batch["loss_mask"].astype(jnp.float32)
        aux["entropy"] = jax.lax.stop_gradient((entropy * mask).sum() /
                                               jnp.maximum(mask.sum(), 1.0))
        aux.update(counts=out.router.counts, mtp_counts=out.mtp_router.counts)
        return loss, aux

    def eval(self, params, router_bias, batch):
        return eval_step(params, router_bias, batch, self.cfg)


def make(c, cfg: ModelConfig) -> GRPO:
    g = c.grpo
    return GRPO(cfg, epsilon=float(g.epsilon), beta=float(g.beta),
                epsilon_high=(float(g.epsilon_high) if g.epsilon_high else None),
                temperature=float(g.temperature))
