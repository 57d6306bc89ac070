"""PHDS on Qwen1.5-MoE-A2.7B (60 routed experts + a shared expert, k_pre 4) with the Tülu-3 SFT mixture.

    python -m phds_jax.train --config=configs/qwen_moe.py \
      --config.init.path=/ckpt/Qwen1.5-MoE-A2.7B --config.data.path=/data/tulu-3-sft-mixture/*.parquet

One epoch of the packed data, derived and printed at start; tags as in docs/method.md.
"""

from configs.base import base_config, public_model_sft, tiny_public_model


def get_config(arg: str | None = None):
  c = base_config()
  c.name = "qwen-moe-phds"
  c.model_type = "qwen2_moe"
  c.init.path = "/ckpt/Qwen1.5-MoE-A2.7B"
  c.schedule.k_train = (2, 3, 4)  # (inferred) k_pre = 4 -> {2, 3, 4}, as the internal k_pre = 4 model (summary)
  c.schedule.anchor = 3  # (summary) "[2,3,4]->3" was the internal k_pre = 4 model's; for Qwen it is inferred
  c.schedule.update(dict(switch_at=0.94, switch_unit="epochs"))  # (summary) ~93.9% of one epoch, by analogy
  # lr (ours): a larger (14.3B total) model; the expert axis 4 divides 60 experts (15 per shard)
  c = public_model_sft(c, lr=1e-5, expert_axis=4)
  c.data.template = "chatml"  # Qwen's chat format, if the checkpoint has no template
  return tiny_public_model(c) if arg == "tiny" else c
