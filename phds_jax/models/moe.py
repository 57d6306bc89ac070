"""The Flax MoE feed-forward block: router, routed experts (sharded when a mesh is active), shared expert."""

from __future__ import annotations

import flax.linen as nn
import jax

from phds_jax.models import expert_parallel
from phds_jax.models import experts as experts_lib
from phds_jax.models import router as router_lib
from phds_jax.models.config import ModelConfig
from phds_jax.models.layers import MLP, Linear, kernel_init


class MoeBlock(nn.Module):
  """Router + routed experts (+ Qwen2's sigmoid-gated shared expert). Returns (y, Routing)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, *, k: int, mode: router_lib.RouterMode,
               token_mask_BxT: jax.Array | None = None):
    cfg = self.cfg
    b, t, d = x_BxTxD.shape
    x_TxD = x_BxTxD.reshape(b * t, d)
    e, f = cfg.num_experts, cfg.moe_ffn
    logits_TxE = Linear(e, cfg, name="router")(x_TxD)
    token_mask_T = None if token_mask_BxT is None else token_mask_BxT.reshape(b * t)
    routing = router_lib.route(logits_TxE, k=k, k_pre=cfg.k_pre, mode=mode, eps=cfg.router_eps,
                               norm_topk_prob=cfg.norm_topk_prob, token_mask_T=token_mask_T,
                               impl=cfg.routing_impl, lb_norm=cfg.router_lb_norm)
    wi = self.param("wi", kernel_init, (e, d, 2 * f), cfg.weight_dtype).astype(cfg.compute_dtype)
    wo = self.param("wo", kernel_init, (e, f, d), cfg.weight_dtype).astype(cfg.compute_dtype)
    x_TxD = x_TxD.astype(cfg.compute_dtype)
    args = (x_TxD, routing.weights_TxS, routing.experts_TxS, wi, wo)
    mesh = expert_parallel.active_mesh()
    if cfg.moe_impl == "dense":
      y_TxD = experts_lib.routed_experts_dense(*args)
    elif mesh is None and experts_lib.use_gathered(b * t, routing.experts_TxS.shape[1], e, cfg.decode_moe):
      y_TxD = experts_lib.routed_experts_gathered(*args)
    elif mesh is not None:
      y_TxD = expert_parallel.routed_experts_sharded(*args, impl=cfg.gmm_impl, mesh=mesh,
                                                     permute_impl=cfg.routing_impl)
    else:
      y_TxD = experts_lib.routed_experts(*args, impl=cfg.gmm_impl, permute_impl=cfg.routing_impl)
    if cfg.shared_ffn:
      gate_Tx1 = jax.nn.sigmoid(Linear(1, cfg, name="shared_gate")(x_TxD))
      y_TxD = y_TxD + gate_Tx1 * MLP(cfg, cfg.shared_ffn, name="shared")(x_TxD)
    return y_TxD.reshape(b, t, d), routing
