"""MoE transformer models with a static top-k level `k` (see transformer.py for usage)."""

from phds_jax.models.attention import KVCache, init_cache
from phds_jax.models.config import ConfigError, ModelConfig, tiny
from phds_jax.models.router import Routing, check_k, route
from phds_jax.models.forward import jit_forward
from phds_jax.models.transformer import Transformer, build, init_params

__all__ = [
    "ConfigError", "KVCache", "ModelConfig", "Routing", "Transformer", "build", "check_k", "init_cache",
    "init_params", "jit_forward", "route", "tiny",
]
