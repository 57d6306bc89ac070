"""How the demo's base model (phds_jax/assets/demo_base) was made: a small OLMoE-style MoE pretrained at
k_pre = 4 on Python standard-library docstrings. Regenerate everything with

    python -m tools.demo_assets --pretrain

(about 10 minutes on 2 CPU cores). All values are ours; this is a toy stand-in for a pretrained MoE.
"""

import os

import phds_jax
from configs.base import base_config

ASSETS = os.path.join(os.path.dirname(phds_jax.__file__), "assets")


def get_config(arg: str | None = None):
  del arg
  c = base_config()
  c.name = "demo-pretrain"
  c.model_type = "olmoe"
  c.init.kind = "scratch"
  c.tokenizer_dir = os.path.join(ASSETS, "demo_tokenizer")
  c.scratch_model.update(dict(
      model_type="olmoe", vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4,
      head_dim=32, num_experts=16, k_pre=4, moe_ffn=64, qk_norm="full", rope_theta=10000.0,
      max_position_embeddings=512))
  c.model.update(dict(dtype="float32", param_dtype="float32"))
  c.router_mode = "hard"  # ordinary top-k pretraining
  c.schedule.update(dict(mode="fixed", k_train=(4,), anchor=0))
  c.loss.lb_coef = 0.01  # keeps experts in use, as OLMoE's pretraining does
  c.optimizer.update(dict(lr=3e-3, warmup_steps=50, decay="cosine", final_lr_fraction=0.1, weight_decay=0.01))
  c.num_steps = 500
  c.batch_size = 16
  c.data.update(dict(path=os.path.join(ASSETS, "demo_corpus", "pretrain.jsonl"), format="text", max_len=256,
                     validation_fraction=0.02))
  c.checkpoint.every_steps = 250
  c.eval.update(dict(every_steps=250, batches=4))
  return c
