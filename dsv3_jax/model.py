"""DeepSeek-V3: embedding, scanned dense and MoE blocks, final norm, head, MTP modules.

Public API:
  variables = init(cfg, rng)           # {"params": ..., "router_bias": ...}
  out = forward(cfg, variables, input_ids, positions=None, segment_ids=None)
  out.logits [B,T,V] f32, out.mtp_logits [D,B,T,V] f32, out.router / out.mtp_router RouterStats
  (counts [L,E], balance_loss [L], batch_balance_loss [L]), out.hidden [B,T,D] (after the final norm), out.mtp_hidden
  [D,B,T,D]; with_logits=False skips the head (the trainer's loss.head_ce applies it chunked).

Decoding against the MLA latent cache (dsv3_jax/kv_cache.py; the loop lives in generate.py):
  ctx = kv_cache.step_context(cache, positions_BT, attn_impl)      # "absorbed" | "naive"
  out, stacks = decode(cfg, variables, input_ids_BT, positions_BT, cache, ctx)
  logits_k, h_k, stacks_k = decode_mtp(cfg, variables, k, h_prev_BTD, next_ids_BT, positions_BT,
                                       cache, ctx)                  # MTP module k as a draft
  cache = kv_cache.commit(cache, ctx, {**stacks, **stacks_k}, num_kept_B)

`router_bias` holds the aux-loss-free selection bias of every MoE layer: a variable collection,
not a parameter, so no optimizer ever touches it; `update_router_bias` applies the paper's rule.
"""
from __future__ import annotations

import contextlib
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv3_jax import kv_cache
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import tp
from dsv3_jax.layers.block import block_stack
from dsv3_jax.layers.common import RMSNorm, acc_dtype, dtype_of, head_logits, normal_init
from dsv3_jax.layers.moe import ROUTER_BIAS, RouterStats
from dsv3_jax.layers.mtp import MTPModule, shift_left


@flax.struct.dataclass
class ModelOutputs:
    logits: jax.Array            # [B, T, V] float32
    mtp_logits: jax.Array        # [D, B, T, V] float32; depth k (1-based) predicts t_{i+k+1}
    router: RouterStats          # main MoE layers: counts [L_moe, E], balance_loss [L_moe]
    mtp_router: RouterStats      # MTP modules: counts [D, E], balance_loss [D]
    hidden: jax.Array            # [B, T, D] main-model hidden state after the final norm
    mtp_hidden: jax.Array        # [D, B, T, D] what the head reads at each MTP depth


@flax.struct.dataclass
class DecodeOutputs:
    logits: jax.Array            # [B, T, V] float32 next-token logits of the new tokens
    hidden: jax.Array            # [B, T, D] after the final norm (what MTP module 1 consumes)


def _empty_stats(cfg: ModelConfig) -> RouterStats:
    return RouterStats(jnp.zeros((0, cfg.n_routed_experts), jnp.int32), jnp.zeros((0,), jnp.float32),
                       jnp.zeros((0,), jnp.float32))


LOCAL_EMBED_GRAD = False   # set by `local_embed_grad()`


@contextlib.contextmanager
def local_embed_grad():
    """While tracing inside, the embedding's gradient is a scatter-add on each device's own
    rows, summed over the batch axes with one all-reduce (`_embed_local_grad`), instead of the
    scatter GSPMD partitions itself. The pipeline executor's branched ticks need it: GSPMD's
    scatter reorders its rows with a collective-permute over all devices, which deadlocks (CPU)
    when only one pipeline rank runs the branch holding it."""
    global LOCAL_EMBED_GRAD
    old, LOCAL_EMBED_GRAD = LOCAL_EMBED_GRAD, True
    try:
        yield
    finally:
        LOCAL_EMBED_GRAD = old


@jax.custom_vjp
def _embed_local_grad(table_VD, ids_BT):
    return jnp.take(table_VD, ids_BT, axis=0)


def _embed_fwd(table_VD, ids_BT):
    return jnp.take(table_VD, ids_BT, axis=0), (ids_BT, table_VD.shape)


def _embed_bwd(res, g_BTD):
    ids_BT, shape = res   # g_BTD has the table's dtype (the gather's output)
    from dsv3_jax.layers.moe import _active_mesh
    from dsv3_jax.sharding import BATCH_AXES
    scatter = lambda ids, g: jnp.zeros(shape, g.dtype).at[ids].add(g)
    mesh = _active_mesh()
    if mesh is None:
        d = scatter(ids_BT, g_BTD)
    else:
        axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
        row = P(axes)
        d = jax.shard_map(lambda i, g: jax.lax.psum(scatter(i, g), axes), in_specs=(row, row),
                          out_specs=P(), axis_names=set(axes), check_vma=False)(ids_BT, g_BTD)
    return d, None


_embed_local_grad.defvjp(_embed_fwd, _embed_bwd)


class Transformer(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        pdt = dtype_of(cfg.param_dtype)
        self.embed = self.param("embed", nn.with_logical_partitioning(
            normal_init(cfg), ("vocab", "embed")), (cfg.vocab_size, cfg.hidden_size), pdt)
        if cfg.num_dense_layers:
            self.dense_layers = block_stack(cfg, False, cfg.num_dense_layers, "dense_layers")
        if cfg.num_moe_layers:
            self.moe_layers = block_stack(cfg, True, cfg.num_moe_layers, "moe_layers")
        self.final_norm = RMSNorm(cfg)
        self.lm_head = self.param("lm_head", nn.with_logical_partitioning(
            normal_init(cfg), ("embed", "vocab")), (cfg.hidden_size, cfg.vocab_size), pdt)
        self.mtp = [MTPModule(cfg, name=f"mtp_{k}") for k in range(cfg.num_nextn_predict_layers)]

    def embed_tokens(self, ids_BT):
        take = _embed_local_grad if LOCAL_EMBED_GRAD else lambda t, i: jnp.take(t, i, axis=0)
        if not tp.active():
            return take(self.embed, ids_BT).astype(dtype_of(self.cfg.dtype))
        # vocab split over `tensor` (pipeline stages): this device's rows, zeros elsewhere
        local, ok = tp.vocab_slice(ids_BT, self.embed.shape[0])
        rows = take(self.embed, jnp.clip(local, 0, self.embed.shape[0] - 1))
        return tp.reduce(jnp.where(ok[..., None], rows, 0)).astype(dtype_of(self.cfg.dtype))

    def head(self, h_BTD):
        """Logits [..., V] (with `tensor` manual: this device's vocab columns)."""
        return head_logits(tp.maybe_copy(h_BTD), self.lm_head, dtype_of(self.cfg.dtype),
                           acc_dtype(self.cfg))

    def front(self, input_ids, positions, segment_ids):
        """Embedding and the dense layers: the part of the model before the MoE stack (with a
        pipeline, the first stage's extra work)."""
        x = self.embed_tokens(input_ids)
        if self.cfg.num_dense_layers:
            x, _ = self.dense_layers(x, positions, segment_ids)
        return x

    def tail(self, x, input_ids, positions, segment_ids, with_mtp: bool = True,
             with_logits: bool = True):
        """Final norm, MTP modules and head after the MoE stack's output x (with a pipeline, the
        last stage's extra work). `router` of the result is empty: the MoE stack's own."""
        cfg = self.cfg
        hidden = self.final_norm(x)
        mtp_hidden, mtp_stats, h = [], [], hidden
        for k, module in enumerate(self.mtp if with_mtp else (), start=1):
            h, stats = module(h, self.embed_tokens(shift_left(input_ids, k)), positions, segment_ids)
            mtp_hidden.append(h)
            mtp_stats.append(stats)
        if mtp_hidden:
            mtp_hidden = jnp.stack(mtp_hidden)
            mtp_router = jax.tree.map(lambda *s: jnp.stack(s), *mtp_stats)
        else:
            mtp_hidden = jnp.zeros((0,) + hidden.shape, hidden.dtype)
            mtp_router = _empty_stats(cfg)
        logits = mtp_logits = None
        if with_logits:
            logits = self.head(hidden)
            mtp_logits = (jnp.stack([self.head(m) for m in mtp_hidden]) if len(mtp_hidden)
                          else jnp.zeros((0,) + logits.shape, logits.dtype))
        return ModelOutputs(logits, mtp_logits, _empty_stats(cfg), mtp_router, hidden, mtp_hidden)

    def __call__(self, input_ids, positions, segment_ids, with_mtp: bool = True,
                 with_logits: bool = True):
        x = self.front(input_ids, positions, segment_ids)
        router = _empty_stats(self.cfg)
        if self.cfg.num_moe_layers:
            x, router = self.moe_layers(x, positions, segment_ids)
        out = self.tail(x, input_ids, positions, segment_ids, with_mtp, with_logits)
        return out.replace(router=router)

    def logits_at(self, hidden_BTD, index_BN):
        """Head logits [B, N, V] at the positions index_BN only (all positions if None)."""
        if index_BN is not None:
            hidden_BTD = jnp.take_along_axis(hidden_BTD, index_BN[..., None], axis=1)
        return self.head(hidden_BTD)

    def decode(self, input_ids_BT, positions_BT, stacks: dict, ctx: kv_cache.StepContext,
               logits_index_BN=None):
        """New tokens against the cached stacks; returns (logits, hidden, updated stacks)."""
        cfg = self.cfg
        x = self.embed_tokens(input_ids_BT)
        new = {}
        if cfg.num_dense_layers:
            x, new["dense_layers"] = self.dense_layers.decode(x, positions_BT,
                                                              stacks["dense_layers"], ctx)
        if cfg.num_moe_layers:
            x, new["moe_layers"] = self.moe_layers.decode(x, positions_BT, stacks["moe_layers"],
                                                          ctx)
        hidden = self.final_norm(x)
        return self.logits_at(hidden, logits_index_BN), hidden, new

    def decode_mtp(self, k: int, h_prev_BTD, next_ids_BT, positions_BT, stack, ctx,
                   logits_index_BN=None):
        """MTP module k (0-based) at the new positions: h_prev is h^{k} (main hidden for k = 0),
        next_ids the token k+1 places ahead. Returns (logits, h^{k+1}, updated stack)."""
        kv = jax.tree.map(lambda a: a[0], stack)                      # [1,B,S,...] -> [B,S,...]
        h, kv = self.mtp[k].decode(h_prev_BTD, self.embed_tokens(next_ids_BT), positions_BT, kv,
                                   ctx)
        return self.logits_at(h, logits_index_BN), h, jax.tree.map(lambda a: a[None], kv)


def _defaults(input_ids, positions, segment_ids):
    b, t = input_ids.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    return positions, segment_ids


def _arrays(variables: dict) -> dict:
    """Variables as jax arrays: callers may pass host NumPy arrays (what ckpt.load_hf returns),
    which the layers would otherwise index with traced values (the grouped GEMM's expert loop).
    Under jit the leaves are tracers already and this is free."""
    return jax.tree.map(jnp.asarray, variables)


def init_boxed(cfg: ModelConfig, rng: jax.Array):
    """Variables with their logical-axis metadata (nn.LogicallyPartitioned boxes)."""
    ids = jnp.zeros((1, 8), jnp.int32)
    pos, seg = _defaults(ids, None, None)
    return Transformer(cfg).init(rng, ids, pos, seg)


def init(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Fresh variables: {"params": trainable weights (f32), "router_bias": selection biases}."""
    variables = jax.jit(functools.partial(init_boxed, cfg))(rng)
    return dict(nn.meta.unbox(variables))


def abstract_variables(cfg: ModelConfig):
    """Shapes and dtypes of the variables, no memory allocated."""
    return nn.meta.unbox(jax.eval_shape(functools.partial(init_boxed, cfg), jax.random.key(0)))


def logical_axes(cfg: ModelConfig):
    """The logical axis names of every variable, as PartitionSpecs of names (router_bias: layers)."""
    boxed = jax.eval_shape(functools.partial(init_boxed, cfg), jax.random.key(0))
    specs = nn.get_partition_spec(boxed)
    # router_bias carries no box; its leading axis is the scanned layer axis.
    specs[ROUTER_BIAS] = jax.tree.map(
        lambda x: jax.sharding.PartitionSpec(*(("layers", "expert") if x.ndim == 2 else ("expert",))),
        boxed[ROUTER_BIAS])
    return specs


def forward(cfg: ModelConfig, variables: dict, input_ids: jax.Array, *,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
            with_mtp: bool = True, with_logits: bool = True) -> ModelOutputs:
    """Full-sequence forward. segment_ids: packed-document ids (0 = padding), default all 1.
    with_logits=False skips the head (logits and mtp_logits are None): for `loss.head_ce`, which
    applies params["lm_head"] to out.hidden / out.mtp_hidden chunk by chunk."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    positions, segment_ids = _defaults(input_ids, positions, segment_ids)
    return Transformer(cfg).apply(_arrays(variables), input_ids, positions, segment_ids, with_mtp,
                                  with_logits)


class _MoEChunk(nn.Module):
    """`length` consecutive MoE layers: one pipeline stage's share of the stack, with the
    parameter tree of Transformer.moe_layers (leading axis `length` instead of num_moe_layers)."""
    cfg: ModelConfig
    length: int

    def setup(self):
        self.moe_layers = block_stack(self.cfg, True, self.length, "moe_layers")

    def __call__(self, x, positions, segment_ids):
        return self.moe_layers(x, positions, segment_ids)


def wgrad_store_shapes(cfg: ModelConfig, variables: dict, x, positions, segment_ids):
    """(inputs, taps): the shapes (`jax.ShapeDtypeStruct`) of what a MoE-stack slice with its
    weight gradients deferred keeps for W (common.WGRAD_INPUTS) and of its zero output taps
    (common.WGRAD_TAPS), each under "moe_layers"; `variables` as for forward_moe_chunk (arrays
    or shapes)."""
    from dsv3_jax.layers.common import WGRAD_INPUTS, WGRAD_TAPS
    _, cols = jax.eval_shape(
        lambda v, x_, p_, s_: forward_moe_chunk(cfg, v, x_, p_, s_,
                                                mutable=(WGRAD_INPUTS, WGRAD_TAPS)),
        variables, x, positions, segment_ids)
    return cols[WGRAD_INPUTS]["moe_layers"], cols[WGRAD_TAPS]["moe_layers"]


def vjp_residuals(vjp, params) -> tuple[list, object, tuple]:
    """(leaves, treedef, where) of a `jax.vjp` function: `where[i]` is the index in
    jax.tree.leaves(params) of leaf i when that leaf is a parameter itself (recognised by
    identity, at trace time), else -1: a residual the VJP keeps beyond its parameters."""
    leaves, tdef = jax.tree.flatten(vjp)
    flat = jax.tree.leaves(params)
    where = tuple(next((i for i, q in enumerate(flat) if leaf is q), -1) for leaf in leaves)
    return leaves, tdef, where


def chunk_residual_shapes(cfg: ModelConfig, variables: dict, x, positions, segment_ids,
                          deferred: bool = False):
    """The shapes (`jax.ShapeDtypeStruct`) of what the VJP of a MoE-stack slice keeps beyond
    its inputs' parameters: the residuals of forward_moe_chunk under cfg.remat's policy, as
    the pipeline executor keeps them per micro-batch (pipeline.recompute=False); `deferred`:
    with the Linears' weight gradients deferred (pipeline.split_w), the residuals of that VJP
    and the Linears' inputs F hands to B for the store. `variables` as for forward_moe_chunk
    (arrays or shapes)."""
    from dsv3_jax.layers.common import WGRAD_INPUTS, WGRAD_TAPS

    def kept(v, x_, p_, s_):
        taps = None
        if deferred:
            taps = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                wgrad_store_shapes(cfg, v, x_, p_, s_)[1])

        def f(params, x2, t):
            v2 = dict(v, params=params)
            if t is None:
                return forward_moe_chunk(cfg, v2, x2, p_, s_), {}
            v2[WGRAD_TAPS] = {"moe_layers": t}
            out, col = forward_moe_chunk(cfg, v2, x2, p_, s_, mutable=(WGRAD_INPUTS,))
            return out, col[WGRAD_INPUTS]
        _, vjp, inputs = jax.vjp(f, v["params"], x_, taps, has_aux=True)
        leaves, _, where = vjp_residuals(vjp, v["params"])
        return [a for a, w in zip(leaves, where) if w < 0] + jax.tree.leaves(inputs)
    return jax.eval_shape(kept, variables, x, positions, segment_ids)


def forward_front(cfg: ModelConfig, variables: dict, input_ids, positions, segment_ids):
    """Embedding + dense layers -> [B, T, D] (reads only embed and dense_layers)."""
    return Transformer(cfg).apply(variables, input_ids, positions, segment_ids,
                                  method=Transformer.front)


def forward_moe_chunk(cfg: ModelConfig, variables: dict, x, positions, segment_ids,
                      mutable: tuple = ()):
    """A slice of the MoE stack: variables {"params": {"moe_layers": ...}, "router_bias":
    {"moe_layers": ...}} with leading axis n (layers); returns (x, RouterStats [n, E]), and with
    `mutable` collections ((x, stats), those collections). With common.WGRAD_INPUTS mutable the
    Linears defer their weight gradients (common.deferred_weight_grads): variables then hold
    common.WGRAD_TAPS, or it is mutable too (to create the zero taps)."""
    n = jax.tree.leaves(variables["params"])[0].shape[0]
    if mutable:
        return _MoEChunk(cfg, n).apply(variables, x, positions, segment_ids,
                                       mutable=list(mutable))
    return _MoEChunk(cfg, n).apply(variables, x, positions, segment_ids)


def forward_tail(cfg: ModelConfig, variables: dict, x, input_ids, positions, segment_ids, *,
                 with_mtp: bool = True, with_logits: bool = True) -> ModelOutputs:
    """Final norm, MTP modules and head after the MoE stack's output x (reads neither
    dense_layers nor moe_layers). `forward` = front -> MoE stack -> tail."""
    return Transformer(cfg).apply(variables, x, input_ids, positions, segment_ids, with_mtp,
                                  with_logits, method=Transformer.tail)


def decode(cfg: ModelConfig, variables: dict, input_ids: jax.Array, positions: jax.Array,
           cache: kv_cache.KVCache, ctx: kv_cache.StepContext, *,
           logits_index: jax.Array | None = None) -> tuple[DecodeOutputs, dict]:
    """The main model over T new tokens per row (positions -1 = padding), attending to the cache
    and to each other causally. Returns the outputs and the main stacks with the new latents
    written at ctx.write_index_B; `kv_cache.commit` makes them part of the cache.

    logits_index [B, N]: compute the head only there (a prefill needs the last token's logits,
    not T x vocab of them); out.logits is then [B, N, V]. out.hidden is always [B, T, D].
    """
    logits, hidden, stacks = Transformer(cfg).apply(_arrays(variables), input_ids, positions,
                                                    cache.stacks, ctx, logits_index,
                                                    method="decode")
    return DecodeOutputs(logits, hidden), stacks


def decode_mtp(cfg: ModelConfig, variables: dict, k: int, h_prev: jax.Array, next_ids: jax.Array,
               positions: jax.Array, cache: kv_cache.KVCache, ctx: kv_cache.StepContext, *,
               logits_index: jax.Array | None = None):
    """MTP module k (0-based) over T new positions against its own cache stack `mtp_{k}`.
    Returns (logits [B,T,V] (or [B,N,V] at logits_index) predicting the token k+2 places ahead,
    h^{k+1} [B,T,D], {"mtp_k": updated stack})."""
    name = f"mtp_{k}"
    logits, h, stack = Transformer(cfg).apply(_arrays(variables), k, h_prev, next_ids, positions,
                                              cache.stacks[name], ctx, logits_index,
                                              method="decode_mtp")
    return logits, h, {name: stack}


def update_router_bias(router_bias: dict, counts_main: jax.Array, counts_mtp: jax.Array,
                       gamma) -> dict:
    """Aux-loss-free balancing (report §2.1.2): b_i += gamma * sign(mean load - load_i).

    counts are the expert loads of the whole global batch, [L_moe, E] and [D, E].
    """
    def step(bias, counts):
        load = counts.astype(jnp.float32)
        return bias + gamma * jnp.sign(load.mean(-1, keepdims=True) - load)

    out = jax.tree.map(lambda x: x, router_bias)
    if "moe_layers" in out:
        b = out["moe_layers"]["block"]["moe"]["bias"]
        out["moe_layers"]["block"]["moe"]["bias"] = step(b, counts_main)
    for k in range(counts_mtp.shape[0]):
        b = out[f"mtp_{k}"]["block"]["moe"]["bias"]
        out[f"mtp_{k}"]["block"]["moe"]["bias"] = step(b, counts_mtp[k])
    return out
