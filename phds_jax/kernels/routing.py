"""Router selection in pure JAX: the twin of the fused Pallas kernel (pallas_routing.py), and what
`kernels.route(impl="jax")` runs.

  route_jax(logits[T,E], token_mask[T]) -> (weights [T,S] fp32, experts [T,S] int32, expert_load [E] fp32)

fp32 softmax over all E experts, exact `lax.top_k` over S slots (ties to the lower expert index), slots past
k weighted `eps` (`slot_weights`), renormalised only if `norm_topk_prob`, and the load counting the k active
slots of unmasked tokens. What k and S mean (hard / soft routing) is models/router.py's business; here they
are two static ints with 1 <= k <= S <= E.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["route_jax", "slot_weights"]


def slot_weights(top_p_TxS: jax.Array, *, k: int, eps: float, norm_topk_prob: bool) -> jax.Array:
  """Combine weights of the S slots from their router probabilities: eps past k, then renormalised if the
  architecture renormalises (after masking, so soft slots take their eps share)."""
  weights_TxS = jnp.where(jnp.arange(top_p_TxS.shape[-1]) < k, top_p_TxS, jnp.float32(eps))
  if norm_topk_prob:
    weights_TxS = weights_TxS / jnp.sum(weights_TxS, axis=-1, keepdims=True)
  return weights_TxS


def route_jax(logits_TxE: jax.Array, token_mask_T: jax.Array, *, k: int, slots: int, eps: float,
              norm_topk_prob: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(weights [T,S], experts [T,S], expert_load [E]); token_mask_T [T] fp32, 1 = count the token.
  Differentiable through the weights (experts and counts are integer-valued)."""
  num_experts = logits_TxE.shape[-1]
  probs_TxE = jax.nn.softmax(logits_TxE.astype(jnp.float32), axis=-1)
  top_p_TxS, experts_TxS = jax.lax.top_k(probs_TxE, slots)
  weights_TxS = slot_weights(top_p_TxS, k=k, eps=eps, norm_topk_prob=norm_topk_prob)
  # Load counts only the k active slots, so sum(load) = k * tokens.
  active_S = jnp.arange(slots) < k
  one_hot_TxSxE = jax.nn.one_hot(experts_TxS, num_experts, dtype=jnp.float32) * active_S[None, :, None]
  expert_load_E = jnp.einsum("tse,t->e", one_hot_TxSxE, token_mask_T.astype(jnp.float32))
  return weights_TxS, experts_TxS, expert_load_E
