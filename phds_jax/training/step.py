"""The PHDS train step: one compiled function for every k level of the schedule.

A step receives `M` microbatches and, for each, an index into the schedule's levels. A `lax.scan` accumulates
gradients over the microbatches; inside it a `lax.switch` picks the branch compiled for that microbatch's k
(k stays a static Python int inside each branch). Changing k between steps or microbatches therefore never
recompiles: the compiled step already holds every level.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from phds_jax import models

Batch = dict[str, jax.Array]


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any


def init_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def sharded_init_state(params: Any, tx: optax.GradientTransformation, mesh) -> tuple[TrainState, Any]:
  """The initial state laid out by the mesh's sharding rules (optimizer moments sharded like their params)."""
  from phds_jax import parallel  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(lambda p: init_state(p, tx), params)
  shardings = parallel.param_shardings(abstract, mesh)
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
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=jnp.sum(stats["nll_sum"]) / norm, nll_sum_M=stats["nll_sum"], tokens_M=stats["tokens"],
                   lb_loss=jnp.mean(stats["lb_loss"]), z_loss=jnp.mean(stats["z_loss"]),
                   expert_load=jnp.sum(stats["expert_load"], axis=0), grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_fn(model_cfg: models.ModelConfig) -> Callable:
  """eval(params, batch, k) -> (nll_sum, tokens), hard routing at k (what serving runs); k static."""
  model = models.build(model_cfg)

  def eval_fn(params, batch: Batch, k: int):
    logits, _ = model.apply({"params": params}, batch["tokens"], k=k, mode="hard", **model_inputs(batch))
    return token_nll(logits, batch["targets"], batch["loss_mask"])

  return jax.jit(eval_fn, static_argnames=("k",))
