"""The router: the one place where the top-k level `k` changes what the model computes.

Everything downstream (dispatch, grouped matmuls, combine) only sees the routing this module returns, with
a static number of slots per token. Two modes:

* ``hard``: exactly ``k`` slots per token, the top-k experts with their (optionally renormalised) router
  probabilities. Used at inference; expert compute is proportional to ``k``.
* ``soft``: ``max(k, k_pre)`` slots (static across k <= k_pre, so one compiled shape serves every level).
  Slots ranked past ``k`` keep their expert but get the constant weight ``eps`` (PHDS §1.4, ε = 1e-6): a tiny
  gradient still reaches those experts, and shapes never change with ``k``. Renormalisation happens only if the
  architecture renormalises (``norm_topk_prob``), after masking. With ``eps = 0`` soft equals hard.

Semantics follow the Hugging Face reference: softmax over *all* experts in fp32, exact ``lax.top_k``, then
optional renormalisation of the kept probabilities. The selection (softmax, top-S, slot weights, expert
counts) is `kernels.route`: ``impl="jax"`` (the default) is plain jnp, ``impl="pallas"`` one fused Pallas
kernel differentiated through the slot weights of the experts it chose (kernels/pallas_routing.py).
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from phds_jax import kernels
from phds_jax.models.config import LB_NORMS, ROUTING_IMPLS

RouterMode = Literal["hard", "soft"]
ROUTER_MODES: tuple[str, ...] = ("hard", "soft")


class Routing(NamedTuple):
  """Per-token routing decision with a static slot count S."""

  weights_TxS: jax.Array  # combine weights (fp32); eps for soft slots past k.
  experts_TxS: jax.Array  # int32 expert ids, slot 0 = highest probability.
  lb_loss: jax.Array  # scalar load-balance loss, normalised by k (scale independent of k).
  z_loss: jax.Array  # scalar router z-loss, mean logsumexp(logits)^2.
  expert_load_E: jax.Array  # tokens routed to each expert by the k active slots, [E] fp32.


def ks_outside(ks: Iterable[Any], upper: int) -> list[Any]:
  """The entries of `ks` that are not integers in [1, upper]: the one k range rule (callers word the error:
  the model allows up to num_experts, training and the k plan up to k_pre)."""
  return [k for k in ks if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= upper]


def check_k(k: int, num_experts: int, k_pre: int) -> None:
  """Validates a requested top-k level; k above k_pre is allowed but flagged (PHDS §6: it does not help)."""
  if not isinstance(k, int) or isinstance(k, bool):
    raise TypeError(f"k must be a Python int (it is static), got {type(k).__name__}: {k!r}")
  if ks_outside([k], num_experts):
    raise ValueError(f"k={k} is out of range: it must satisfy 1 <= k <= num_experts={num_experts}")
  if k > k_pre:
    logging.warning("k=%d is above the checkpoint's k_pre=%d; PHDS only targets k <= k_pre.", k, k_pre)


def num_slots(k: int, k_pre: int, mode: RouterMode) -> int:
  """Static number of expert slots per token computed for (k, mode)."""
  if mode == "hard":
    return k
  if mode == "soft":
    return max(k, k_pre)
  raise ValueError(f"router mode {mode!r} is not one of {ROUTER_MODES}")


def route(logits_TxE: jax.Array, *, k: int, k_pre: int, mode: RouterMode = "hard",
          eps: float = 1e-6, norm_topk_prob: bool = False,
          token_mask_T: jax.Array | None = None, impl: str = "jax", lb_norm: str = "k") -> Routing:
  """Turns router logits into a static-shape top-k routing at level ``k``.

  Args:
    logits_TxE: router logits for T tokens over E experts (any float dtype; computed in fp32).
    k: active experts per token (static Python int).
    k_pre: the checkpoint's pretraining top-k; sets the soft-mode slot count.
    mode: 'hard' (exactly k slots) or 'soft' (max(k, k_pre) slots, ranks past k weighted eps).
    eps: weight of soft slots past k.
    norm_topk_prob: renormalise the kept weights to sum to one (Qwen3-MoE; not OLMoE/Qwen1.5).
    token_mask_T: 1 for real tokens, 0 for padding; padding is excluded from the aux statistics.
    impl: 'jax' or 'pallas' (the fused selection kernel; same results, see module docstring).
    lb_norm: 'k' divides the balance loss by k (1 at perfect balance for every k, so a k curriculum does not
      rescale it; ours, docs/method.md §1.5); 'hf' is transformers' OLMoE/Qwen form, k times larger, so
      `lb_coef` means what `router_aux_loss_coef` means there.
  """
  if lb_norm not in LB_NORMS:
    raise ValueError(f"lb_norm {lb_norm!r} is not one of {LB_NORMS}")
  if impl not in ROUTING_IMPLS:
    raise ValueError(f"router impl {impl!r} is not one of {ROUTING_IMPLS}")
  num_tokens, num_experts = logits_TxE.shape
  slots = num_slots(k, k_pre, mode)
  logits = logits_TxE.astype(jnp.float32)
  probs_TxE = jax.nn.softmax(logits, axis=-1)
  if token_mask_T is None:
    token_mask_T = jnp.ones((num_tokens,), jnp.float32)
  token_mask_T = token_mask_T.astype(jnp.float32)
  n_tokens = jnp.maximum(jnp.sum(token_mask_T), 1.0)

  weights_TxS, experts_TxS, expert_load_E = kernels.route(logits, token_mask_T, k=k, slots=slots, eps=eps,
                                                          norm_topk_prob=norm_topk_prob, impl=impl)
  frac_tokens_E = expert_load_E / n_tokens  # sums to k
  mean_prob_E = jnp.einsum("te,t->e", probs_TxE, token_mask_T) / n_tokens
  # Switch-style balance loss E * sum_e f_e P_e (transformers' form, = k at perfect balance); divided by k
  # by default so that it equals 1 at perfect balance for every k.
  lb_loss = num_experts * jnp.sum(frac_tokens_E * mean_prob_E)
  if lb_norm == "k":
    lb_loss = lb_loss / k
  z_loss = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * token_mask_T) / n_tokens
  return Routing(weights_TxS, experts_TxS.astype(jnp.int32), lb_loss, z_loss, expert_load_E)
