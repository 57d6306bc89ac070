"""Defaults shared by every training config; each config file overrides what differs.

Values marked (paper) come from MoE-PHDS (arXiv 2509.23012, summarised with sources in docs/method.md); the rest are ours.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "phds"
  c.seed = 0
  c.model_type = ""  # expected architecture of the init checkpoint ("" = any)
  c.init = ml_collections.ConfigDict(dict(kind="hf", path=""))  # hf | orbax | scratch
  c.tokenizer_dir = ""  # default: init.path
  # ModelConfig overrides applied after loading: bf16 compute over fp32 master weights.
  # gmm_impl / routing_impl: kernels (README, "Installing for GPU or TPU"); router_eps (paper: ε = 1e-6).
  c.model = ml_collections.ConfigDict(dict(dtype="bfloat16", param_dtype="float32", gmm_impl="auto",
                                           routing_impl="jax", router_eps=1e-6))
  c.scratch_model = ml_collections.ConfigDict()  # ModelConfig fields, for init.kind == "scratch"
  c.router_mode = "soft"  # (paper) soft top-k mask: static k_pre slots, ε past k
  c.schedule = ml_collections.ConfigDict(dict(
      mode="curriculum",  # (paper) multi-k mixing, then anchored at a low k
      k_train=(2, 3, 4), anchor=2,
      switch_at=0.94,  # (paper) curriculum started at ~93.9% of one epoch
      ramp=0.0,  # 0 = hard switch to the anchor (ours: the paper does not give the shape)
      probs=(),  # () = uniform (paper)
      granularity="microbatch"))  # the users' design; the paper says "each step" (use "step" for that reading)
  c.loss = ml_collections.ConfigDict(dict(lb_coef=0.0, z_coef=0.0))  # (paper) no aux loss for public models
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=2e-5, warmup_steps=20, decay="linear", final_lr_fraction=0.0,  # ours: Tülu-3 style SFT defaults
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip=1.0, freeze_router=False))
  c.num_steps = 1000
  c.batch_size = 8  # global rows per optimizer step
  c.microbatches = 1  # gradient accumulation (one k per microbatch when granularity="microbatch")
  c.data = ml_collections.ConfigDict(dict(
      path="", format="auto", max_len=2048, template="auto", validation_fraction=0.01, holdout_seed=0,
      on_error="raise", overlong="truncate", packing="first_fit", num_threads=2))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1))
  # verify: read each new step back and match its manifest before older steps are deleted (training/checkpointing.py)
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=200, keep=2, async_save=True, verify=True))
  # Fields that may differ from the checkpoint's config on resume (e.g. "optimizer.lr,data"; training/resume.py).
  c.resume = ml_collections.ConfigDict(dict(allow_changes=()))
  c.max_nonfinite_in_a_row = 1  # updates with a non-finite loss/gradient are skipped; stop after this many in a row
  c.eval = ml_collections.ConfigDict(dict(every_steps=200, batches=8, ks=()))  # ks () = 1..k_pre ∪ K_train
  c.final_eval = ml_collections.ConfigDict(dict(tasks=(), limit=0, batch_size=16))  # MC tasks per k at the end
  c.export = ml_collections.ConfigDict(dict(hf=True, orbax=True))
  c.peak_tflops = 0.0  # per-device peak for MFU (0 = look up by device kind)
  return c


def tiny_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`:tiny` variants: a few short steps on small batches, for smoke runs of a real config."""
  c.num_steps = 20
  c.batch_size = 2
  c.microbatches = 1
  c.data.max_len = 256
  c.checkpoint.every_steps = 10
  c.eval.every_steps = 10
  c.eval.batches = 2
  return c
