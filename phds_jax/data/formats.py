"""Record formats: raw dicts (JSON, parquet rows, tfds examples) -> the normalized chat / text records.

`chat` (HF / Tülu-3 `messages`), `instruction` (alpaca / CommonSense170K `instruction`, optional `input`,
`output`; becomes one user turn `instruction\n\ninput` and one assistant turn), `text` (`{"text": ...}`), and
`auto` (picked per record from its keys). `fields` renames keys: `{"output": "answer"}` reads `output` from
`answer`. Problems raise ValueError with a reason; the source adds the location.

`raw` is for readers with their own schema (the evaluation tasks): the record as plain Python (`to_python`),
unchecked beyond being an object. It is not a training format (`FORMATS`), only a source format
(`SOURCE_FORMATS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

Format = Literal["auto", "chat", "instruction", "text"]
FORMATS: tuple[str, ...] = ("auto", "chat", "instruction", "text")
RAW = "raw"
SOURCE_FORMATS: tuple[str, ...] = FORMATS + (RAW,)
ROLES: tuple[str, ...] = ("system", "user", "assistant")


def to_python(x: Any) -> Any:
  """tfds/numpy values -> plain Python (bytes -> str, arrays -> lists), so every reader sees one schema."""
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, Mapping):
    return {str(k): to_python(v) for k, v in x.items()}
  if isinstance(x, np.ndarray):
    return [to_python(v) for v in x.tolist()] if x.ndim else to_python(x.item())
  if isinstance(x, (list, tuple)):
    return [to_python(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def _as_str(value: Any, what: str) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  if isinstance(value, str):
    return str(value)
  raise ValueError(f"{what} must be a string, got {type(value).__name__}")


def _get(raw: Mapping, key: str, fields: Mapping[str, str], required: bool = True) -> Any:
  name = fields.get(key, key)
  if name not in raw or raw[name] is None:
    if required:
      raise ValueError(f"missing field {name!r} (have {sorted(raw)})")
    return None
  return raw[name]


def _messages(value: Any) -> list[dict[str, str]]:
  """Validates a chat; also accepts tfds' dict-of-lists form of a `Sequence` feature."""
  if isinstance(value, Mapping) and "role" in value and "content" in value:
    value = [{"role": r, "content": c} for r, c in zip(value["role"], value["content"])]
  if isinstance(value, np.ndarray):
    value = list(value)
  if not isinstance(value, list) or not value:
    raise ValueError(f"'messages' must be a non-empty list, got {type(value).__name__}")
  out = []
  for i, m in enumerate(value):
    if not isinstance(m, Mapping):
      raise ValueError(f"message {i} must be an object, got {type(m).__name__}")
    if "role" not in m or "content" not in m:
      raise ValueError(f"message {i} needs 'role' and 'content' (have {sorted(m)})")
    role = _as_str(m["role"], f"message {i} role")
    if role not in ROLES:
      raise ValueError(f"message {i} has unknown role {role!r}; expected one of {ROLES}")
    out.append({"role": role, "content": _as_str(m["content"], f"message {i} content")})
  if not any(m["role"] == "assistant" for m in out):
    raise ValueError("no assistant turn: nothing to train on")
  return out


def _detect(raw: Mapping, fields: Mapping[str, str]) -> str:
  for fmt, key in (("chat", "messages"), ("instruction", "output"), ("text", "text")):
    if fields.get(key, key) in raw:
      return fmt
  raise ValueError(f"cannot tell the format from keys {sorted(raw)}: expected 'messages', 'instruction'+'output' or "
                   "'text' (set format= or fields=)")


def normalize(raw: Any, fmt: str = "auto", fields: Mapping[str, str] | None = None) -> dict[str, Any]:
  """One raw record -> `{"messages": [...]}` or `{"text": str}` (`raw`: the record itself, as plain Python);
  raises ValueError saying what is wrong."""
  fields = fields or {}
  if not isinstance(raw, Mapping):
    raise ValueError(f"record must be a JSON object, got {type(raw).__name__}")
  if fmt == RAW:
    return to_python(raw)
  if fmt == "auto":
    fmt = _detect(raw, fields)
  if fmt == "chat":
    return {"messages": _messages(_get(raw, "messages", fields))}
  if fmt == "instruction":
    instruction = _as_str(_get(raw, "instruction", fields), "'instruction'")
    extra = _get(raw, "input", fields, required=False)
    extra = _as_str(extra, "'input'") if extra is not None else ""
    output = _as_str(_get(raw, "output", fields), "'output'")
    if not instruction.strip():
      raise ValueError("empty 'instruction'")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]}
  if fmt == "text":
    text = _as_str(_get(raw, "text", fields), "'text'")
    if not text.strip():
      raise ValueError("empty 'text'")
    return {"text": text}
  raise ValueError(f"unknown format {fmt!r}; expected one of {SOURCE_FORMATS}")
