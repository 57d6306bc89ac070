"""phds_jax: one MoE checkpoint, any top-k (MoE-PHDS in JAX/Flax)."""

__version__ = "0.1.0"
