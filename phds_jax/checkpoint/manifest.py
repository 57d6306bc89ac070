"""The manifest of a saved state: CRC32, shape and dtype of every array, to tell a damaged step from a good one.

Computed from the in-memory state when it is saved (a non-finite value is refused there) and again from what
is read back; `compare_manifests` names the first difference. `shape_differences` explains a state that does
not fit the config (another model, another version of TrainState) in words.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from typing import Any

import jax
import numpy as np

MANIFEST_VERSION = 1


def _key_name(k: Any) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _leaf_name(path: Any) -> str:
  return "/".join(_key_name(k) for k in path)


def _crc(array: np.ndarray) -> int:
  return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _pieces(leaf: Any) -> list[tuple[str, np.ndarray]]:
  """(suffix, host array) for a leaf: the whole array, or this process's shards when not fully addressable."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return [(f"@{s.index}", np.asarray(s.data)) for s in leaf.addressable_shards if s.replica_id == 0]
  return [("", np.asarray(leaf))]


def manifest_of(state: Any) -> dict[str, Any]:
  """{'arrays': name -> {crc32, shape, dtype}} of every array in `state`; raises on a non-finite value."""
  arrays, bad = {}, []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = _leaf_name(path)
    for suffix, host in _pieces(leaf):
      if np.issubdtype(host.dtype, np.inexact) and not np.isfinite(host.astype(np.float32)).all():
        bad.append(name)
      arrays[name + suffix] = {"crc32": _crc(host), "shape": list(host.shape), "dtype": str(host.dtype)}
  if bad:
    raise FloatingPointError(f"refusing to checkpoint a state with non-finite values in {bad[:5]}")
  return {"version": MANIFEST_VERSION, "arrays": arrays}


def compare_manifests(saved: dict[str, Any], restored: dict[str, Any]) -> str | None:
  """None if they match, else the first difference in words (only names present in both are compared)."""
  a, b = saved.get("arrays", {}), restored.get("arrays", {})
  common = sorted(set(a) & set(b))
  if not common:  # another process's shards (multi-host) or another sharding: nothing comparable here
    logging.warning("checkpoint manifest: no array comparable on this process; restored without a checksum check")
    return None
  for name in common:
    for field in ("shape", "dtype", "crc32"):
      if a[name][field] != b[name][field]:
        return f"array {name}: {field} {b[name][field]} read back, {a[name][field]} written"
  return None


def abstract_state(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of `state`: the target a later read-back restores into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                      state)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {_leaf_name(p): tuple(getattr(x, "shape", ())) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shape_differences(saved: Any, target: Any, limit: int = 5) -> list[str]:
  """Readable differences between the saved parameter shapes and the ones this config builds.

  Only `params` is compared leaf by leaf (Orbax names optimizer-state nodes differently from the live tree);
  the top-level fields must match (a state from another version of TrainState does not fit).
  """
  if dataclasses.is_dataclass(target):
    fields = sorted(saved) if isinstance(saved, dict) else []
    want = sorted(f.name for f in dataclasses.fields(target))
    if fields != want:
      return [f"state fields: checkpoint {fields}, this version {want}"]
    saved, target = saved["params"], target.params
  a, b = _flat_shapes(saved), _flat_shapes(target)
  out = [f"{n}: checkpoint {a[n]}, config {b[n]}" for n in sorted(set(a) & set(b)) if a[n] != b[n]]
  out += [f"{n}: only in the checkpoint" for n in sorted(set(a) - set(b))]
  out += [f"{n}: only in this config" for n in sorted(set(b) - set(a))]
  return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])
