"""Hugging Face checkpoint interop for OLMoE, Qwen1.5-MoE (`qwen2_moe`) and Qwen3-MoE.

`load` turns a transformers checkpoint directory (config.json + safetensors, single or sharded) into our
`ModelConfig` and Flax parameter tree; `save` writes the reverse, in the per-expert key layout that
`AutoModelForCausalLM.from_pretrained` reads. Both stream tensor by tensor so that a 7B model never exists
twice in host memory.

Every parameter leaf is described by a list of `Piece`s: which HF tensor fills which slice of the leaf and
how it is transposed. That one table drives loading, saving and validation, so the three cannot disagree.

Dtypes: `load` gives float32 parameters unless `dtype` is passed (the checkpoint's own dtype is not used,
because training wants float32 master weights); `save` keeps the parameters' dtype (or `dtype`) and writes it
into config.json as `dtype`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from phds_jax.hf.config import config_from_hf, config_to_hf
from phds_jax.hf.layout import Leaf, LeafPath, Piece, param_specs
from phds_jax.models.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

Params = dict[str, Any]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                    "chat_template.json", "generation_config.json")
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be read or written; the message names the tensor and file."""


# ----------------------------------------------------------------------------------------------- loading


class _Reader:
  """Lazily opened safetensors files of one checkpoint, addressed by tensor name."""

  def __init__(self, root: Path):
    self.root = root
    self.key_file = _key_files(root)
    self._handles: dict[str, Any] = {}

  def _open(self, key: str):
    name = self.key_file[key]
    if name not in self._handles:
      if not (self.root / name).is_file():
        raise CheckpointError(f"tensor {key!r}: file {self.root / name} listed in {_INDEX} does not exist")
      self._handles[name] = _safe_open(self.root / name)
    return self._handles[name]

  def where(self, key: str) -> str:
    return str(self.root / self.key_file[key])

  def header(self, key: str) -> tuple[str, tuple[int, ...]]:
    sl = self._open(key).get_slice(key)
    return sl.get_dtype(), tuple(sl.get_shape())

  def get(self, key: str) -> np.ndarray:
    return self._open(key).get_tensor(key)

  def close(self) -> None:
    for handle in self._handles.values():
      handle.__exit__(None, None, None)
    self._handles.clear()


def _safe_open(path: Path):
  """safe_open, with a damaged file (truncated, not safetensors) named in the error."""
  try:
    return safe_open(str(path), framework="numpy")
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own untyped errors)
    raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def _key_files(root: Path) -> dict[str, str]:
  """tensor name -> file name, from the shard index or the single safetensors file."""
  if (root / _INDEX).is_file():
    return dict(json.loads((root / _INDEX).read_text())["weight_map"])
  if (root / _SINGLE).is_file():
    with _safe_open(root / _SINGLE) as f:
      return {key: _SINGLE for key in f.keys()}
  if list(root.glob("pytorch_model*.bin")) or (root / "pytorch_model.bin.index.json").exists():
    raise CheckpointError(f"{root} holds only PyTorch .bin weights; only safetensors checkpoints are supported "
                          "(re-save with transformers' save_pretrained(safe_serialization=True))")
  raise CheckpointError(f"{root}: no {_SINGLE} or {_INDEX} found")


def read_config(path: str | os.PathLike, **overrides) -> ModelConfig:
  """The ModelConfig of the HF checkpoint directory `path` (errors name the config file)."""
  file = Path(path) / "config.json"
  if not file.is_file():
    raise CheckpointError(f"{file} not found: not a Hugging Face checkpoint directory")
  try:
    return config_from_hf(json.loads(file.read_text()), **overrides)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{file}: malformed JSON ({e})") from e
  except ConfigError as e:
    raise ConfigError(f"{file}: {e}") from e


def _validate(specs: dict[LeafPath, Leaf], reader: _Reader, cfg: ModelConfig, strict: bool) -> None:
  """Checks names, shapes and dtypes from the headers alone, before any tensor data is read."""
  wanted = [p for leaf in specs.values() for p in leaf.pieces]
  missing = [p.key for p in wanted if p.key not in reader.key_file]
  if missing:
    raise CheckpointError(f"{reader.root}: missing tensor {missing[0]!r}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  for p in wanted:
    dtype, shape = reader.header(p.key)
    if shape != p.shape:
      raise CheckpointError(f"tensor {p.key!r} in {reader.where(p.key)}: expected shape {p.shape}, got {shape}")
    if not (dtype.startswith("F") or dtype == "BF16"):  # F16/F32/F64/F8_*, BF16; not I*/U*/BOOL
      raise CheckpointError(f"tensor {p.key!r} in {reader.where(p.key)}: dtype {dtype} is not floating point")
  used = {p.key for p in wanted}
  ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
  unused = sorted(k for k in reader.key_file
                  if k not in used and k not in ignorable and not k.endswith("rotary_emb.inv_freq"))
  if unused:
    msg = f"{reader.root}: {len(unused)} tensor(s) not used by {cfg.model_type}: {', '.join(unused[:20])}"
    if strict:
      raise CheckpointError(msg)
    log.warning(msg)


def load(path: str | os.PathLike, dtype: Any = None, *, strict: bool = False, progress: bool = False,
         **config_overrides) -> tuple[ModelConfig, Params]:
  """Reads an HF checkpoint directory into (ModelConfig, params) with params of `dtype` (default float32).

  Each leaf is assembled on the host in the target dtype, moved to a jax array, and its host copy dropped.
  Expert weights may be per-expert tensors or transformers' fused stacks (detected per layer). Tensors that
  the model does not use are logged as a warning, or raise with `strict=True`.
  """
  root = Path(path)
  target = jnp.dtype(dtype or "float32")
  cfg = read_config(root, **config_overrides).replace(param_dtype=target.name)
  reader = _Reader(root)
  fused = {i for i in range(cfg.num_layers) if f"model.layers.{i}.mlp.experts.gate_up_proj" in reader.key_file}
  specs = param_specs(cfg, fused)
  flat: dict[LeafPath, jax.Array] = {}
  with contextlib.closing(reader), tqdm(total=sum(len(l.pieces) for l in specs.values()), desc="loading",
                                        unit="tensor", disable=not progress) as bar:
    _validate(specs, reader, cfg, strict)
    for leaf_path, leaf in specs.items():
      host = np.empty(leaf.shape, target)
      for p in leaf.pieces:
        tensor = reader.get(p.key)
        host[p.index] = tensor if p.perm is None else np.transpose(tensor, p.perm)
        del tensor
        bar.update()
      flat[leaf_path] = jnp.asarray(host)
      del host
  return cfg, traverse_util.unflatten_dict(flat)


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
  """The fast tokenizer of a checkpoint directory (or a tokenizer.json path)."""
  file = Path(path)
  if file.is_dir():
    file = file / "tokenizer.json"
  if not file.is_file():
    raise CheckpointError(f"{file} not found: a tokenizer.json (fast tokenizer) is required")
  return tokenizers.Tokenizer.from_file(str(file))


# ------------------------------------------------------------------------------------------------ saving


def _weights_dtype(flat: dict[LeafPath, Any], dtype: Any) -> jnp.dtype:
  """The dtype the file (and config.json) will carry: `dtype`, else the embedding's."""
  out = jnp.dtype(dtype if dtype is not None else flat[("embed", "embedding")].dtype)
  if out.name not in ("float32", "bfloat16", "float16"):
    raise CheckpointError(f"cannot save weights as {out.name}; use float32, bfloat16 or float16")
  return out


def _check_tree(flat: dict[LeafPath, Any], specs: dict[LeafPath, Leaf]) -> None:
  """Every expected leaf present with its shape, and nothing else (which `save` would silently drop)."""
  for path, leaf in specs.items():
    if path not in flat:
      raise CheckpointError(f"params lack leaf {'/'.join(path)}")
    if tuple(flat[path].shape) != leaf.shape:
      raise CheckpointError(f"param {'/'.join(path)}: expected shape {leaf.shape}, got {tuple(flat[path].shape)}")
  extra = sorted("/".join(p) for p in flat if p not in specs)
  if extra:
    raise CheckpointError(f"params have leaves the HF layout has no place for: {', '.join(extra[:10])}")


def _plan_shards(pieces: list[tuple[LeafPath, Piece]], itemsize: int,
                 max_bytes: int) -> list[list[tuple[LeafPath, Piece]]]:
  """Greedy shards in file order; a tensor larger than `max_bytes` gets a shard of its own."""
  shards: list[list[tuple[LeafPath, Piece]]] = [[]]
  size = 0
  for item in pieces:
    nbytes = int(np.prod(item[1].shape)) * itemsize
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes
  return shards


def _host_tensors(flat: dict[LeafPath, Any], shard: list[tuple[LeafPath, Piece]], dtype: jnp.dtype,
                  bar: tqdm) -> Iterator[tuple[str, np.ndarray]]:
  """HF tensors of one shard; one parameter leaf at a time is copied to the host."""
  cached_path, host = None, None
  for leaf_path, p in shard:
    if leaf_path != cached_path:  # pieces of a leaf are contiguous: keep one leaf on the host at a time
      cached_path, host = leaf_path, None  # drop the previous leaf before fetching the next
      host = np.asarray(jax.device_get(flat[leaf_path]))
    part = host[p.index]
    if p.perm is not None:
      part = np.transpose(part, np.argsort(p.perm))
    bar.update()
    yield p.key, np.ascontiguousarray(part, dtype=dtype)


def _generation_config(hf: dict) -> dict:
  out = {key: hf[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(key) is not None}
  return {"_from_model_config": True, **out}


def _commit(tmp: Path, dst: Path) -> None:
  """Puts the finished `tmp` at `dst` by renames, so `dst` is never a half-written checkpoint."""
  if dst.exists() and any(dst.iterdir()):
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{time.time_ns()}")
    os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old)
  else:
    if dst.exists():
      dst.rmdir()
    os.rename(tmp, dst)


def save(path: str | os.PathLike, cfg: ModelConfig, params: Params, k: int | None = None, *,
         max_shard_bytes: int = 5 * 2**30, tokenizer_dir: str | os.PathLike | None = None,
         overwrite: bool = False, dtype: Any = None, progress: bool = False) -> Path:
  """Writes an HF checkpoint directory that `AutoModelForCausalLM.from_pretrained` loads.

  Weights keep their dtype unless `dtype` is given (cast tensor by tensor); `k` sets num_experts_per_tok.
  Shards are built and written one at a time into a temporary sibling directory that is renamed into place
  at the end. Tokenizer files (and generation_config.json) are copied from `tokenizer_dir` if given.
  """
  dst = Path(path).absolute()
  if dst.exists() and not dst.is_dir():
    raise FileExistsError(f"{dst} exists and is not a directory")
  if dst.exists() and any(dst.iterdir()) and not overwrite:
    raise FileExistsError(f"{dst} exists and is not empty; pass overwrite=True to replace it")
  if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
    raise CheckpointError(f"tokenizer_dir {tokenizer_dir} is not a directory")
  specs = param_specs(cfg)
  flat = traverse_util.flatten_dict(params)
  _check_tree(flat, specs)
  wdtype = _weights_dtype(flat, dtype)
  cfg = cfg.replace(param_dtype=wdtype.name)
  hf_config = config_to_hf(cfg, k)
  pieces = [(leaf_path, p) for leaf_path, leaf in specs.items() for p in leaf.pieces]
  shards = _plan_shards(pieces, wdtype.itemsize, max_shard_bytes)
  names = ([_SINGLE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
  try:
    weight_map: dict[str, str] = {}
    with tqdm(total=len(pieces), desc="saving", unit="tensor", disable=not progress) as bar:
      for name, shard in zip(names, shards):
        tensors = dict(_host_tensors(flat, shard, wdtype, bar))
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update((key, name) for key in tensors)
        del tensors
    if len(shards) > 1:
      total = sum(int(np.prod(p.shape)) * wdtype.itemsize for _, p in pieces)
      index = {"metadata": {"total_size": total}, "weight_map": weight_map}
      (tmp / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
      if (Path(tokenizer_dir) / name).is_file():
        shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    if not (tmp / "generation_config.json").exists():
      (tmp / "generation_config.json").write_text(json.dumps(_generation_config(hf_config), indent=2) + "\n")
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700, and safetensors writes its files 0600
    for f in tmp.iterdir():
      os.chmod(f, 0o644)
    _commit(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dst
