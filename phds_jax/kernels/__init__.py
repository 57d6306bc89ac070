"""Kernels behind the MoE layer, one API: `gmm`, `tgmm`, `gather_rows`, `weighted_combine` and `route`.

Each op has one table of implementations tried in order with fallbacks (registry.py); the entry points and
their argument checks are in ops.py. Beside every Pallas kernel is its pure-JAX twin: grouped_matmul.py
(pallas_gmm.py, tokamax_gmm.py), permute.py (pallas_permute.py), routing.py (pallas_routing.py). Shared
pieces: tiling.py (tile sizes), gmm_vjp.py (the grouped-matmul gradient rule), probes.py (does a kernel
compile on this device?), platform.py (the platform kernels are chosen and lowered for), tuning.py (the
order `impl="auto"` tries per device kind). This file only re-exports.
"""

from phds_jax.kernels.grouped_matmul import (gmm_dense, gmm_ragged_dot, gmm_tiled, tgmm_dense, tgmm_ragged_dot,
                                             tgmm_tiled)
from phds_jax.kernels.ops import (check_gmm_shapes, check_tgmm_shapes, gather_rows, gmm, route, tgmm,
                                  weighted_combine)
from phds_jax.kernels.pallas_gmm import gmm_pallas, tgmm_pallas
from phds_jax.kernels.pallas_permute import gather_rows_pallas, weighted_combine_pallas
from phds_jax.kernels.pallas_routing import route_fused, route_pallas
from phds_jax.kernels.permute import gather_rows_jax, weighted_combine_jax
from phds_jax.kernels.platform import lowering_for, target_platform
from phds_jax.kernels.probes import compiles_on_device
from phds_jax.kernels.registry import (GMM_IMPLS, IMPLS, OPS, PERMUTE_IMPLS, ROUTING_IMPLS, dispatch,
                                       impl_order)
from phds_jax.kernels.routing import route_jax, slot_weights
from phds_jax.kernels.tokamax_gmm import gmm_tokamax, tgmm_tokamax
from phds_jax.kernels.tuning import AUTO_ORDERS, SMALL_PROBLEM_MACS, auto_order, device_kind

__all__ = [
    "AUTO_ORDERS", "GMM_IMPLS", "IMPLS", "OPS", "PERMUTE_IMPLS", "ROUTING_IMPLS", "SMALL_PROBLEM_MACS",
    "auto_order", "check_gmm_shapes", "check_tgmm_shapes", "compiles_on_device", "device_kind", "dispatch",
    "gather_rows", "gather_rows_jax", "gather_rows_pallas", "gmm", "gmm_dense", "gmm_pallas", "gmm_ragged_dot",
    "gmm_tiled", "gmm_tokamax", "impl_order", "lowering_for", "route", "route_fused", "route_jax",
    "route_pallas", "slot_weights", "target_platform", "tgmm", "tgmm_dense", "tgmm_pallas", "tgmm_ragged_dot",
    "tgmm_tiled", "tgmm_tokamax", "weighted_combine", "weighted_combine_jax", "weighted_combine_pallas",
]
