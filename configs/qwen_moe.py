"""PHDS on Qwen1.5-MoE-A2.7B (60 routed experts + a shared expert, k_pre 4) with the Tülu-3 SFT mixture.

    python -m phds_jax.train --config=configs/qwen_moe.py \
      --config.init.path=/ckpt/Qwen1.5-MoE-A2.7B --config.data.path=/data/tulu-3-sft-mixture/*.parquet
"""

from configs.base import base_config, tiny_overrides


def get_config(arg: str | None = None):
  c = base_config()
  c.name = "qwen-moe-phds"
  c.model_type = "qwen2_moe"
  c.init.path = "/ckpt/Qwen1.5-MoE-A2.7B"
  c.schedule.k_train = (2, 3, 4)  # (paper, inferred) k_pre = 4 -> {2, 3, 4}
  c.schedule.anchor = 3  # (paper) "[2,3,4]->3" on its k_pre=4 model; 2 is the other option
  c.data.path = "/data/tulu-3-sft-mixture/*.parquet"
  c.data.max_len = 4096
  c.data.template = "chatml"  # Qwen's chat format, if the checkpoint has no template
  c.batch_size = 128
  c.microbatches = 8
  c.num_steps = 7000
  c.optimizer.lr = 1e-5  # ours: a larger (14.3B total) model
  c.optimizer.warmup_steps = 200
  c.mesh.update(dict(data=-1, fsdp=1, expert=4))  # ours: 4 divides 60 (60 experts -> 15 per shard)
  c.checkpoint.every_steps = 500
  c.eval.every_steps = 500
  if arg == "tiny":
    c = tiny_overrides(c)
    c.mesh.update(dict(data=-1, fsdp=1, expert=1))
  return c
