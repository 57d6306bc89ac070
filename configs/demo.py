"""The embedded default: PHDS on the shipped demo base, offline, on 2 CPU cores in a few minutes.

    python -m phds_jax.train --config=configs/demo.py

Starts from phds_jax/assets/demo_base (a small OLMoE-style MoE pretrained at k_pre = 4, see
configs/demo_pretrain.py), fine-tunes it on sentence-completion chats made from stdlib docstrings with the
PHDS recipe (K_train {2,3,4}, anchored at 2), then prints held-out loss and multiple-choice accuracy per k.
"""

import os

import phds_jax
from configs.base import base_config

ASSETS = os.path.join(os.path.dirname(phds_jax.__file__), "assets")


def get_config(arg: str | None = None):
  c = base_config()
  c.name = "demo"
  c.model_type = "olmoe"
  c.init.path = os.path.join(ASSETS, "demo_base")
  c.model.update(dict(dtype="float32", param_dtype="float32"))  # CPU: fp32 is faster than emulated bf16
  c.schedule.update(dict(mode="curriculum", k_train=(2, 3, 4), anchor=2, switch_at=0.9))  # (paper) [2,3,4]->anchor
  c.optimizer.update(dict(lr=1e-3, warmup_steps=10, decay="linear"))  # ours: a toy model tolerates a high lr
  c.num_steps = 150
  c.batch_size = 16
  c.microbatches = 2
  c.data.update(dict(path=os.path.join(ASSETS, "demo_sft", "train.jsonl"), format="chat", max_len=128,
                     validation_fraction=0.05))
  c.checkpoint.update(dict(every_steps=50, keep=2))
  c.eval.update(dict(every_steps=50, batches=4))
  c.final_eval.update(dict(tasks=("jsonl:" + os.path.join(ASSETS, "demo_sft", "mc_eval.jsonl"),), limit=0))
  if arg == "tiny":
    c.num_steps, c.batch_size, c.checkpoint.every_steps, c.eval.every_steps = 6, 4, 3, 3
    c.final_eval.limit = 16
  return c
