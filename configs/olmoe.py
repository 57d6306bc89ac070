"""PHDS on OLMoE-1B-7B-0125 (64 experts, k_pre 8) with the Tülu-3 SFT mixture.

    python -m phds_jax.train --config=configs/olmoe.py \
      --config.init.path=/ckpt/OLMoE-1B-7B-0125 --config.data.path=/data/tulu-3-sft-mixture/*.parquet
    python -m phds_jax.train --config=configs/olmoe.py:tiny ...   # smoke run

The length is one epoch of the packed data: the trainer counts the packed rows at start and prints the
derivation (rows, steps per epoch, the step the anchor starts at). Tags as in docs/method.md: (summary),
(review), (model card), (inferred), (ours). configs/compare_olmoe.py runs this recipe for every baseline.
"""

from configs.base import base_config, public_model_sft, tiny_public_model


def get_config(arg: str | None = None):
  c = base_config()
  c.name = "olmoe-phds"
  c.model_type = "olmoe"
  c.init.path = "/ckpt/OLMoE-1B-7B-0125"  # set on the command line
  c.schedule.k_train = (4, 5, 6, 7, 8)  # (summary) "mix 4-8" for k_pre = 8
  c.schedule.anchor = 4  # (inferred) a low anchor at k_pre/2; (review) the paper swept it: configs/compare_olmoe.py
  # (summary) the curriculum began at ~93.9% of one epoch (CommonSense170K run); used here by analogy (inferred).
  c.schedule.update(dict(switch_at=0.94, switch_unit="epochs"))
  c = public_model_sft(c, lr=2e-5, expert_axis=8)  # lr (ours): Tülu-3's SFT default for 1B-class models
  return tiny_public_model(c) if arg == "tiny" else c
