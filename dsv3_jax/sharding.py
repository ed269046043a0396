"""Meshes and the one table of logical-axis rules (no model import).

Mesh axes: data (pure data parallel), fsdp (data parallel with parameters sharded along `embed`),
expert (expert parallel: routed experts split across it; it also carries a slice of the batch,
as in DeepSeek's EP), pipeline (the MoE layers cut into stages; dsv3_jax/pipeline runs the
schedule), tensor (heads and FFN widths). The batch is split over data x fsdp x expert.

Sharding mode: meshes are built with Auto axis types and the train step is a jit with explicit
in/out shardings (the pjit style): GSPMD propagates inside, shard_map takes over in the MoE
dispatch. jax >= 0.10 defaults `jax.make_mesh` to Explicit axes, so we say Auto deliberately.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.errors import UserError

AXES = ("data", "fsdp", "expert", "pipeline", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")
ZERO1_AXES = ("data",)          # optimizer moments are sharded over these even when params aren't

# logical name -> mesh axes. Names not listed are replicated.
RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "moe_mlp": ("tensor",),
    "expert": ("expert",),
    "layers": ("pipeline",),
}


class MeshError(UserError):
    """A mesh that does not fit the devices, the model or the batch."""


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills the one -1 axis; checks names and that the product equals the device count."""
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise MeshError(f"unknown mesh axes {sorted(unknown)}; known: {AXES}")
    shape = {a: int(sizes.get(a, 1)) for a in AXES}
    fill = [a for a, s in shape.items() if s == -1]
    if len(fill) > 1:
        raise MeshError(f"at most one mesh axis may be -1, got {fill}")
    bad = [a for a, s in shape.items() if s == 0 or s < -1]
    if bad:
        raise MeshError(f"mesh axis sizes must be positive (or one -1): {bad}")
    known = math.prod(s for s in shape.values() if s != -1)
    if fill:
        if num_devices % known:
            raise MeshError(f"cannot fill mesh axis {fill[0]!r}: {num_devices} devices are not "
                            f"divisible by the other axes' product {known}")
        shape[fill[0]] = num_devices // known
    if math.prod(shape.values()) != num_devices:
        raise MeshError(f"mesh {shape} has {math.prod(shape.values())} devices, but "
                        f"{num_devices} are present")
    return shape


def validate_mesh(shape: Mapping[str, int], cfg, global_batch: int) -> None:
    """All the model/batch constraints of a mesh, reported together, before any compile."""
    errors = []
    batch_ways = math.prod(shape[a] for a in BATCH_AXES)
    if global_batch % batch_ways:
        errors.append(f"batch {global_batch} (rows per micro-batch) is not divisible by "
                      f"data*fsdp*expert = {batch_ways}")
    if cfg.n_routed_experts % shape["expert"]:
        errors.append(f"n_routed_experts {cfg.n_routed_experts} is not divisible by the expert "
                      f"axis ({shape['expert']})")
    if cfg.num_attention_heads % shape["tensor"]:
        errors.append(f"num_attention_heads {cfg.num_attention_heads} is not divisible by the "
                      f"tensor axis ({shape['tensor']})")
    if shape["pipeline"] > 1 and cfg.num_moe_layers < shape["pipeline"]:
        errors.append(f"{cfg.num_moe_layers} MoE layers do not split over pipeline="
                      f"{shape['pipeline']} ranks (every stage needs at least one MoE layer)")
    if errors:
        raise MeshError("mesh does not fit:\n  - " + "\n  - ".join(errors))


def make_mesh(shape: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
    devices = devices if devices is not None else jax.devices()
    return jax.make_mesh(tuple(shape[a] for a in AXES), AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def logical_to_mesh(names: tuple, shape: tuple[int, ...], mesh_shape: Mapping[str, int],
                    uneven: bool = False) -> P:
    """A PartitionSpec from logical names; a dim keeps only the mesh axes that divide it (all of
    them with uneven=True, for planning) and that no earlier dim already uses."""
    used, out = set(), []
    for name, dim in zip(names, shape):
        axes = [a for a in RULES.get(name, ()) if a not in used and mesh_shape[a] > 1]
        kept = []
        for a in axes:
            if uneven or dim % (math.prod(mesh_shape[k] for k in kept) * mesh_shape[a]) == 0:
                kept.append(a)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def _spec_axes(entry) -> tuple:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def local_shape(shape: tuple[int, ...], spec: P, mesh_shape: Mapping[str, int]) -> tuple:
    """The largest shard's shape (ceil division where a dim does not split evenly)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    return tuple(-(-d // math.prod(mesh_shape[a] for a in _spec_axes(e)))
                 for d, e in zip(shape, entries))


def add_zero1(spec: P, shape: tuple[int, ...], mesh_shape: Mapping[str, int]) -> P:
    """Also shard an optimizer-moment leaf over the ZeRO-1 axes on the first dim that divides."""
    return add_axes(spec, shape, mesh_shape, ZERO1_AXES)


def add_axes(spec: P, shape: tuple[int, ...], mesh_shape: Mapping[str, int],
             axes: tuple[str, ...]) -> P:
    """spec also sharded over `axes` (those of size > 1 it does not use yet) on the first dim
    that divides by all its axes together; unchanged if no dim does."""
    extra = [a for a in axes if mesh_shape[a] > 1]
    if not extra:
        return spec
    entries = list(spec) + [None] * (len(shape) - len(spec))
    used = {a for e in entries for a in _spec_axes(e)}
    extra = [a for a in extra if a not in used]
    for i, dim in enumerate(shape):
        have = _spec_axes(entries[i])
        ways = math.prod(mesh_shape[a] for a in have + tuple(extra))
        if extra and dim % ways == 0:
            new = have + tuple(extra)
            entries[i] = new[0] if len(new) == 1 else new
            return P(*entries)
    return spec


def batch_spec(ndim: int, lead: int = 0) -> P:
    """Rows on the batch axes; `lead` leading unsharded dims (e.g. the micro-batch axis)."""
    return P(*([None] * lead), BATCH_AXES, *([None] * (ndim - lead - 1)))


def named(mesh, spec_tree):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), spec_tree,
                        is_leaf=lambda x: isinstance(x, P))


def describe(spec_tree, shapes) -> list[str]:
    """Human-readable 'path shape -> spec' lines (the planning tool and tests print these)."""
    flat = jax.tree_util.tree_flatten_with_path(spec_tree, is_leaf=lambda x: isinstance(x, P))[0]
    leaves = jax.tree.leaves(shapes)
    return [f"{jax.tree_util.keystr(p)} {tuple(l.shape)} -> {s}" for (p, s), l in zip(flat, leaves)]


def mesh_shape_of(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, np.shape(mesh.devices)))
