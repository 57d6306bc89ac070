"""Hugging Face checkpoints in and out: `hf.load(dir)` -> (ModelConfig, params), `hf.save(dir, cfg, params, k=)`.

Three rooms: `config` maps config.json <-> ModelConfig, `layout` says which HF tensor fills which slice of
which parameter leaf, `io` streams safetensors through that table (and copies tokenizer files).
"""

from phds_jax.hf.config import config_from_hf, config_to_hf
from phds_jax.hf.io import (TOKENIZER_FILES, CheckpointError, load, load_tokenizer, read_config, save)
from phds_jax.hf.layout import param_specs

__all__ = ["TOKENIZER_FILES", "CheckpointError", "config_from_hf", "config_to_hf", "load", "load_tokenizer",
           "param_specs", "read_config", "save"]
