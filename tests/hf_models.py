"""Tiny random transformers MoE models (CPU, a few hundred KB) for interop and logit-parity tests."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

_BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             num_experts=8, num_experts_per_tok=4, tie_word_embeddings=False, max_position_embeddings=128,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=0, eos_token_id=1,
             pad_token_id=2)
_FAMILY = {
    "olmoe": dict(intermediate_size=16),
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24),
    # head_dim != hidden / heads, as in the real Qwen3-MoE models.
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=16, head_dim=16, norm_topk_prob=True),
}


def tiny_hf_config(model_type: str, **config_overrides) -> transformers.PretrainedConfig:
  return transformers.AutoConfig.for_model(model_type, **{**_BASE, **_FAMILY[model_type], **config_overrides})


def make_tiny_hf_model(model_type: str, tmp_dir: str | os.PathLike, *, seed: int = 0,
                       max_shard_size: str | int | None = None,
                       **config_overrides) -> tuple[torch.nn.Module, Path]:
  """A seeded random `AutoModelForCausalLM` saved with `save_pretrained` into `tmp_dir`/`model_type`.

  Norm scales and biases (initialised to 1 / 0 by transformers) are perturbed so that a mix-up between them
  cannot go unnoticed. Returns the float32 model in eval mode and its directory.
  """
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(model_type, **config_overrides))
  with torch.no_grad():
    for param in model.parameters():
      if param.ndim == 1:
        param.add_(0.1 * torch.randn_like(param))
  model.eval()
  out = Path(tmp_dir) / model_type
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(out, **kwargs)
  return model, out
