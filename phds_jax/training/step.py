"""The PHDS train step: one compiled function for every k level of the schedule.

A step receives `M` microbatches and, for each, an index into the schedule's levels. A `lax.scan` accumulates
gradients over the microbatches; inside it a `lax.switch` picks the branch compiled for that microbatch's k
(k stays a static Python int inside each branch). Changing k between steps or microbatches therefore never
recompiles: the compiled step already holds every level.

An update is applied only if the loss, every gradient, and the new parameters and optimizer state are finite;
otherwise the step keeps the old state (inside the compiled step, by a select) and counts the skip in
`TrainState.skipped`, so a non-finite value can never reach the parameters or a checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from phds_jax import models, sharding
from phds_jax.models import forward

Batch = dict[str, jax.Array]


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # steps taken (data consumed), applied or skipped
  params: Any
  opt_state: Any
  skipped: jax.Array  # updates skipped because something was non-finite (over the whole run)


def init_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    skipped=jnp.zeros((), jnp.int32))


def all_finite(tree: Any) -> jax.Array:
  """True iff every floating-point leaf of `tree` is finite (integer leaves, e.g. Adam's count, are ignored)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `ok`, else `old`, leaf by leaf (a select: no host round trip, no recompile)."""
  return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)


def sharded_init_state(params: Any, tx: optax.GradientTransformation, mesh) -> tuple[TrainState, Any]:
  """The initial state laid out by the mesh's sharding rules (optimizer moments sharded like their params)."""
  abstract = jax.eval_shape(lambda p: init_state(p, tx), params)
  shardings = sharding.param_shardings(abstract, mesh)
  params = jax.device_put(params, shardings.params)
  return jax.jit(lambda p: init_state(p, tx), out_shardings=shardings)(params), shardings


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array):
  """(sum of masked next-token NLL, number of masked tokens), in fp32."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]
  mask = mask_BxT.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


def model_inputs(batch: Batch) -> dict[str, jax.Array]:
  """Keyword inputs of the model for a packed batch (attention stays inside segments)."""
  return dict(positions=batch["positions"], segment_ids=batch["segment_ids"],
              attention_mask=(batch["segment_ids"] > 0).astype(jnp.int32))


def make_loss_fn(model_cfg: models.ModelConfig, k: int, mode: str, lb_coef: float, z_coef: float):
  """loss(params, microbatch, normaliser) for a fixed k; CE is summed and divided by the step's token count."""
  model = models.build(model_cfg)

  def loss_fn(params, mb: Batch, norm: jax.Array, num_microbatches: int):
    logits, aux = model.apply({"params": params}, mb["tokens"], k=k, mode=mode, **model_inputs(mb))
    nll_sum, count = token_nll(logits, mb["targets"], mb["loss_mask"])
    aux_loss = (lb_coef * aux["lb_loss"] + z_coef * aux["z_loss"]) / num_microbatches
    stats = dict(nll_sum=nll_sum, tokens=count, lb_loss=aux["lb_loss"], z_loss=aux["z_loss"],
                 expert_load=jnp.sum(aux["expert_load"], axis=0))
    return nll_sum / norm + aux_loss, stats

  return loss_fn


def make_train_step(model_cfg: models.ModelConfig, levels: tuple[int, ...], tx: optax.GradientTransformation,
                    *, mode: str = "soft", lb_coef: float = 0.0, z_coef: float = 0.0) -> Callable:
  """train_step(state, batch[M, B, L], level_idx[M]) -> (state, metrics); jit it (shardings outside)."""
  grad_fns = [jax.value_and_grad(make_loss_fn(model_cfg, k, mode, lb_coef, z_coef), has_aux=True)
              for k in levels]

  def train_step(state: TrainState, batch: Batch, level_idx_M: jax.Array):
    num_mb = level_idx_M.shape[0]
    norm = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    branches = [lambda p, mb, g=g: g(p, mb, norm, num_mb) for g in grad_fns]
    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

    def body(acc, xs):
      mb, idx = xs
      (_, stats), grads = jax.lax.switch(idx, branches, state.params, mb)
      acc = jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
      return acc, stats

    grads, stats = jax.lax.scan(body, zeros, (batch, level_idx_M))
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, state.params)
    loss = jnp.sum(stats["nll_sum"]) / norm
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grads_ok = jnp.isfinite(loss) & all_finite(grads)
    ok = grads_ok & all_finite(params) & all_finite(opt_state)
    params, opt_state = keep_if(ok, params, state.params), keep_if(ok, opt_state, state.opt_state)
    metrics = dict(loss=loss, applied=ok, grads_finite=grads_ok, nll_sum_M=stats["nll_sum"], tokens_M=stats["tokens"],
                   lb_loss=jnp.mean(stats["lb_loss"]), z_loss=jnp.mean(stats["z_loss"]),
                   expert_load=jnp.sum(stats["expert_load"], axis=0), grad_norm=optax.tree.norm(grads))
    skipped = state.skipped + jnp.where(ok, 0, 1).astype(state.skipped.dtype)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, skipped=skipped), metrics

  return train_step


def make_eval_fn(model_cfg: models.ModelConfig) -> Callable:
  """eval(params, batch, k) -> (nll_sum, tokens), hard routing at k (what serving runs); k static."""
  apply = forward.apply_fn(model_cfg)

  def eval_fn(params, batch: Batch, k: int):
    logits, _ = apply(params, batch["tokens"], k=k, mode="hard", **model_inputs(batch))
    return token_nll(logits, batch["targets"], batch["loss_mask"])

  return jax.jit(eval_fn, static_argnames=("k",))
