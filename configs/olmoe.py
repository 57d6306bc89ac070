"""PHDS on OLMoE-1B-7B-0125 (64 experts, k_pre 8) with the Tülu-3 SFT mixture.

    python -m phds_jax.train --config=configs/olmoe.py \
      --config.init.path=/ckpt/OLMoE-1B-7B-0125 --config.data.path=/data/tulu-3-sft-mixture/*.parquet
    python -m phds_jax.train --config=configs/olmoe.py:tiny ...   # smoke run
"""

from configs.base import base_config, tiny_overrides


def get_config(arg: str | None = None):
  c = base_config()
  c.name = "olmoe-phds"
  c.model_type = "olmoe"
  c.init.path = "/ckpt/OLMoE-1B-7B-0125"  # set on the command line
  c.schedule.k_train = (4, 5, 6, 7, 8)  # (paper) "mix 4-8" for k_pre = 8
  c.schedule.anchor = 4  # ours: a low anchor at k_pre/2; the paper sweeps it
  c.data.path = "/data/tulu-3-sft-mixture/*.parquet"  # (paper) Tülu-3 SFT mixture
  c.data.max_len = 4096  # ours (Tülu-3 recipe)
  c.batch_size = 128  # ours
  c.microbatches = 8
  c.num_steps = 7000  # ours: ~1 epoch of Tülu-3 at this batch/length
  c.optimizer.lr = 2e-5  # ours (Tülu-3 SFT default for 1B-class models)
  c.optimizer.warmup_steps = 200  # ours: ~3%
  c.mesh.update(dict(data=-1, fsdp=1, expert=8))  # ours: expert parallel over 8 devices
  c.checkpoint.every_steps = 500
  c.eval.every_steps = 500
  if arg == "tiny":
    c = tiny_overrides(c)
    c.mesh.update(dict(data=-1, fsdp=1, expert=1))
  return c
