"""The parameter layout table: which Hugging Face tensor fills which slice of which of our leaves.

One table (`param_specs`) drives loading, saving and validation in hf/io.py, so the three cannot disagree.
Kernels are `[in, out]` here and torch Linear weights `[out, in]`; each `Piece` says how to transpose.
"""

from __future__ import annotations

import dataclasses

from phds_jax.models.config import ModelConfig

LeafPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Piece:
  """One HF tensor that fills `leaf[index]` after `np.transpose(tensor, perm)`."""

  key: str
  shape: tuple[int, ...]  # HF shape
  index: tuple = ()
  perm: tuple[int, ...] | None = None


_T = (1, 0)  # torch Linear [out, in] <-> our kernel [in, out]
_ET = (0, 2, 1)  # fused expert stacks [E, out, in] <-> [E, in, out]
_ALL = slice(None)


@dataclasses.dataclass(frozen=True)
class Leaf:
  shape: tuple[int, ...]
  pieces: tuple[Piece, ...]


def _linear(specs: dict, path: LeafPath, key: str, din: int, dout: int, bias: bool = False) -> None:
  specs[(*path, "kernel")] = Leaf((din, dout), (Piece(f"{key}.weight", (dout, din), perm=_T),))
  if bias:
    specs[(*path, "bias")] = Leaf((dout,), (Piece(f"{key}.bias", (dout,)),))


def _vector(specs: dict, path: LeafPath, key: str, n: int) -> None:
  specs[path] = Leaf((n,), (Piece(key, (n,)),))


def _glu(specs: dict, path: LeafPath, key: str, d: int, f: int) -> None:
  """A SwiGLU MLP: wi [D, 2F] = [gate | up] columns, wo [F, D]."""
  specs[(*path, "wi")] = Leaf((d, 2 * f), (
      Piece(f"{key}.gate_proj.weight", (f, d), (_ALL, slice(0, f)), _T),
      Piece(f"{key}.up_proj.weight", (f, d), (_ALL, slice(f, 2 * f)), _T)))
  specs[(*path, "wo")] = Leaf((f, d), (Piece(f"{key}.down_proj.weight", (d, f), perm=_T),))


def _experts(specs: dict, path: LeafPath, key: str, e: int, d: int, f: int, fused: bool) -> None:
  """Routed experts, from per-expert Linear weights or from transformers' fused in-memory stacks."""
  if fused:
    wi = (Piece(f"{key}.gate_up_proj", (e, 2 * f, d), perm=_ET),)
    wo = (Piece(f"{key}.down_proj", (e, d, f), perm=_ET),)
  else:
    wi = tuple(p for i in range(e) for p in (
        Piece(f"{key}.{i}.gate_proj.weight", (f, d), (i, _ALL, slice(0, f)), _T),
        Piece(f"{key}.{i}.up_proj.weight", (f, d), (i, _ALL, slice(f, 2 * f)), _T)))
    wo = tuple(Piece(f"{key}.{i}.down_proj.weight", (d, f), (i,), _T) for i in range(e))
  specs[(*path, "wi")] = Leaf((e, d, 2 * f), wi)
  specs[(*path, "wo")] = Leaf((e, f, d), wo)


def param_specs(cfg: ModelConfig, fused_layers: frozenset[int] | set[int] = frozenset()) -> dict[LeafPath, Leaf]:
  """Our parameter leaves, in HF file order, each with the HF tensors it is made of."""
  d, hd, v = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
  q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
  specs: dict[LeafPath, Leaf] = {}
  specs[("embed", "embedding")] = Leaf((v, d), (Piece("model.embed_tokens.weight", (v, d)),))
  for i in range(cfg.num_layers):
    lp, key = f"layer_{i}", f"model.layers.{i}"
    a = f"{key}.self_attn"
    _vector(specs, (lp, "input_norm", "scale"), f"{key}.input_layernorm.weight", d)
    _linear(specs, (lp, "attn", "q_proj"), f"{a}.q_proj", d, q_out, cfg.qkv_bias)
    _linear(specs, (lp, "attn", "k_proj"), f"{a}.k_proj", d, kv_out, cfg.qkv_bias)
    _linear(specs, (lp, "attn", "v_proj"), f"{a}.v_proj", d, kv_out, cfg.qkv_bias)
    _linear(specs, (lp, "attn", "o_proj"), f"{a}.o_proj", q_out, d, cfg.o_bias)
    if cfg.qk_norm != "none":
      full = cfg.qk_norm == "full"
      _vector(specs, (lp, "attn", "q_norm", "scale"), f"{a}.q_norm.weight", q_out if full else hd)
      _vector(specs, (lp, "attn", "k_norm", "scale"), f"{a}.k_norm.weight", kv_out if full else hd)
    _vector(specs, (lp, "post_attn_norm", "scale"), f"{key}.post_attention_layernorm.weight", d)
    if not cfg.moe_layers[i]:
      _glu(specs, (lp, "mlp"), f"{key}.mlp", d, cfg.dense_ffn)
      continue
    _linear(specs, (lp, "moe", "router"), f"{key}.mlp.gate", d, cfg.num_experts)
    _experts(specs, (lp, "moe"), f"{key}.mlp.experts", cfg.num_experts, d, cfg.moe_ffn, i in fused_layers)
    if cfg.shared_ffn:
      _glu(specs, (lp, "moe", "shared"), f"{key}.mlp.shared_expert", d, cfg.shared_ffn)
      _linear(specs, (lp, "moe", "shared_gate"), f"{key}.mlp.shared_expert_gate", d, 1)
  _vector(specs, ("final_norm", "scale"), "model.norm.weight", d)
  if not cfg.tie_embeddings:
    _linear(specs, ("lm_head",), "lm_head", d, v)
  return specs
