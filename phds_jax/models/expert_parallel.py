"""Routed experts under `shard_map`: tokens stay on their data shard; experts may be split over an axis.

With a device mesh active (`jax.set_mesh`), each device routes and computes its own tokens (no global sort
across devices). When the mesh's `expert` axis has n > 1 shards, each shard holds E/n experts and token-slots
travel to their expert's shard and back with `all_to_all`. Buffers are sized for the worst case (every slot to
one shard), so the computation is dropless and equals the single-device one exactly; `lax.ragged_all_to_all`
would avoid that padding on GPU/TPU but has no CPU lowering, and this path must run in CPU tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from phds_jax import kernels
from phds_jax import sharding
from phds_jax.sharding import EXPERT_AXIS
from phds_jax.models.experts import combine, dispatch, routed_experts, sort_by_expert
from phds_jax.models.layers import swiglu



def active_mesh():
  """The mesh set with `jax.set_mesh` if it has more than one device, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size <= 1:
    return None
  return mesh


def _exchanged_experts(x_TxD, weights_TxS, experts_TxS, wi_LxDx2F, wo_LxFxD, *, impl, permute_impl, shards):
  """Experts split over `shards` devices of the expert axis; slots exchanged with all_to_all."""
  num_tokens, slots = experts_TxS.shape
  local_e = wi_LxDx2F.shape[0]
  n = num_tokens * slots
  order_N, inverse_N, sizes_E = sort_by_expert(experts_TxS, local_e * shards)
  xs_NxD = dispatch(x_TxD, order_N, inverse_N, slots, permute_impl)  # sorted by expert = grouped by destination shard

  # Send buffer [shards, n, D]: block j holds the rows for shard j's experts, zero-padded.
  sizes_PxL = sizes_E.reshape(shards, local_e)
  send_counts_P = jnp.sum(sizes_PxL, axis=1)
  send_starts_P = jnp.cumsum(send_counts_P) - send_counts_P
  row_N = jnp.arange(n)
  src_PxN = jnp.minimum(send_starts_P[:, None] + row_N[None, :], n - 1)
  valid_PxN = row_N[None, :] < send_counts_P[:, None]
  send_PxNxD = jnp.where(valid_PxN[..., None], xs_NxD[src_PxN], 0)
  recv_PxNxD = jax.lax.all_to_all(send_PxNxD, EXPERT_AXIS, 0, 0)
  recv_sizes_PxL = jax.lax.all_to_all(sizes_PxL, EXPERT_AXIS, 0, 0)  # [source, my local expert]

  # Received blocks are each sorted by local expert; regroup all of them by local expert for the gmm.
  ends_PxL = jnp.cumsum(recv_sizes_PxL, axis=1)
  local_id_PxN = jax.vmap(lambda ends: jnp.searchsorted(ends, row_N, side="right"))(ends_PxL)
  order_R, inverse_R, _ = sort_by_expert(local_id_PxN, local_e + 1)  # id local_e = padding, sorts last
  group_sizes_L = jnp.sum(recv_sizes_PxL, axis=0).astype(jnp.int32)
  xr_RxD = recv_PxNxD.reshape(shards * n, -1)[order_R]
  h = kernels.gmm(xr_RxD, wi_LxDx2F, group_sizes_L, impl=impl)
  yr_RxD = kernels.gmm(swiglu(h), wo_LxFxD, group_sizes_L, impl=impl)
  back_PxNxD = jax.lax.all_to_all(yr_RxD[inverse_R].reshape(shards, n, -1), EXPERT_AXIS, 0, 0)

  # Row r of the sorted slots went to shard dest(r) at offset r - start(dest).
  dest_N = jnp.sort(experts_TxS.reshape(-1)) // local_e
  ys_NxD = back_PxNxD[dest_N, row_N - send_starts_P[dest_N]]
  return combine(ys_NxD, order_N, inverse_N, weights_TxS, x_TxD.dtype, permute_impl)


def routed_experts_sharded(x_TxD, weights_TxS, experts_TxS, wi_ExDx2F, wo_ExFxD, *, impl, mesh,
                           permute_impl="jax"):
  """Routed expert FFN over `mesh`: tokens sharded on every axis, experts on the `expert` axis."""
  axes, pieces = sharding.batch_axes(mesh), sharding.batch_shards(mesh)
  if x_TxD.shape[0] % pieces:
    raise ValueError(f"{x_TxD.shape[0]} tokens do not split over {pieces} batch shards {axes}")
  shards = mesh.shape.get(EXPERT_AXIS, 1)
  if wi_ExDx2F.shape[0] % shards:
    raise ValueError(f"{wi_ExDx2F.shape[0]} experts do not split over expert axis of size {shards}")
  tok = P(axes, None)
  if shards > 1:
    fn = lambda *a: _exchanged_experts(*a, impl=impl, permute_impl=permute_impl, shards=shards)
    w_spec = P(EXPERT_AXIS, None, None)
  else:
    # all experts local: the single-device computation
    fn = lambda *a: routed_experts(*a, impl=impl, permute_impl=permute_impl)
    w_spec = P(None, None, None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(tok, tok, tok, w_spec, w_spec), out_specs=tok,
                       check_vma=False)(x_TxD, weights_TxS, experts_TxS, wi_ExDx2F, wo_ExFxD)
