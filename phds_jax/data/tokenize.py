"""Tokenization of normalized records into training examples with a next-token loss mask.

An example of `n` tokens is three aligned arrays: `tokens` (the ids), `targets` (`tokens` shifted left by one:
the token each position must predict) and `loss_mask` (1 where that target is trained: assistant tokens of a
chat, every token of plain text). The last position has no target inside the example (target 0, mask 0), except
when the example was truncated, where the first cut-off token serves as its target.

BOS/EOS: chats are encoded exactly as `apply_chat_template(tokenize=True)` does (the template writes any special
tokens; `add_special_tokens=False`). Plain text gets BOS when the tokenizer config asks for it (`add_bos_token`, or
a BOS token is defined and the flag is absent) and always EOS, so packed documents end as they do in pretraining.
Special-token strings inside message text are encoded as special tokens (transformers' default).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import tokenizers

from phds_jax.data import chat
from phds_jax.data.errors import DataError, DataStats, check_choice

Overlong = Literal["error", "truncate", "skip"]
OVERLONG: tuple[str, ...] = ("error", "truncate", "skip")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_str(value: Any) -> str | None:
  """A special token as written in tokenizer_config.json: a string or a serialized AddedToken dict."""
  if isinstance(value, Mapping):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _checkpoint_template(directory: str, config: Mapping[str, Any]) -> str | None:
  """The checkpoint's own template: `chat_template.jinja` (transformers >= 4.50) or tokenizer_config's field."""
  path = os.path.join(directory, "chat_template.jinja")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  template = config.get("chat_template")
  if isinstance(template, list):  # Several named templates: use the default one, as transformers does.
    template = {t.get("name"): t.get("template") for t in template}.get("default")
  return template if isinstance(template, str) else None


def resolve_template(spec: str, checkpoint_template: str | None, vocab: Mapping[str, int]) -> str:
  """`spec` -> Jinja source. "auto": the checkpoint's, else ChatML if the vocab has `<|im_start|>`, else Tülu;
  "checkpoint" (must exist), "tulu", "chatml", a Jinja string, or a path to a .jinja file."""
  if spec == "auto":
    if checkpoint_template:
      return checkpoint_template
    return chat.CHATML_TEMPLATE if "<|im_start|>" in vocab else chat.TULU_TEMPLATE
  if spec == "checkpoint":
    if not checkpoint_template:
      raise ValueError("template='checkpoint' but the checkpoint has no chat_template")
    return checkpoint_template
  if spec in chat.BUILTIN_TEMPLATES:
    return chat.BUILTIN_TEMPLATES[spec]
  if "{{" in spec or "{%" in spec:
    return spec
  if os.path.isfile(spec):
    with open(spec, encoding="utf-8") as f:
      return f.read()
  raise ValueError(f"template={spec!r}: not 'auto', 'checkpoint', {tuple(chat.BUILTIN_TEMPLATES)}, Jinja or a file")


@dataclasses.dataclass
class ChatTokenizer:
  """A `tokenizers.Tokenizer` plus what SFT needs from the checkpoint's tokenizer config (picklable)."""

  tokenizer: tokenizers.Tokenizer
  template: str
  special_tokens: dict[str, str]  # bos_token, eos_token, ... as the chat template sees them.
  text_bos: bool = False
  text_eos: bool = True

  @classmethod
  def from_dir(cls, directory: str, template: str = "auto") -> ChatTokenizer:
    """From a checkpoint directory holding `tokenizer.json` (+ optional `tokenizer_config.json`)."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no tokenizer.json (only fast tokenizers are supported)")
    tok = tokenizers.Tokenizer.from_file(path)
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    fallback = _read_json(os.path.join(directory, "special_tokens_map.json"))
    special = {k: s for k in _SPECIAL_KEYS if (s := _token_str(config.get(k, fallback.get(k)))) is not None}
    has_bos = "bos_token" in special and tok.token_to_id(special["bos_token"]) is not None
    source = resolve_template(template, _checkpoint_template(directory, config), tok.get_vocab())
    return cls(tok, source, special, text_bos=bool(config.get("add_bos_token", has_bos)) and has_bos)

  def _special_id(self, key: str) -> int | None:
    token = self.special_tokens.get(key)
    return None if token is None else self.tokenizer.token_to_id(token)

  @property
  def bos_id(self) -> int | None:
    return self._special_id("bos_token")

  @property
  def eos_id(self) -> int | None:
    return self._special_id("eos_token")

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def render(self, messages, add_generation_prompt: bool = False) -> str:
    return chat.render(self.template, messages, add_generation_prompt, **self.special_tokens)

  def encode_chat(self, messages) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32[n], is_assistant bool[n]): a token is an assistant token when it starts inside a turn's span."""
    text, spans = chat.assistant_spans(self.template, messages, **self.special_tokens)
    enc = self.tokenizer.encode(text, add_special_tokens=False)
    starts = np.asarray([s for s, _ in enc.offsets], np.int64)
    trained = np.zeros(len(starts), bool)
    for lo, hi in spans:
      trained |= (starts >= lo) & (starts < hi)
    return np.asarray(enc.ids, np.int32), trained

  def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, all-True mask) with BOS/EOS per `text_bos` / `text_eos`."""
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    if self.text_bos and self.bos_id is not None:
      ids = [self.bos_id] + ids
    if self.text_eos and self.eos_id is not None:
      ids = ids + [self.eos_id]
    return np.asarray(ids, np.int32), np.ones(len(ids), bool)

  def encode(self, record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    if "messages" in record:
      return self.encode_chat(record["messages"])
    return self.encode_text(record["text"])


def make_example(ids: np.ndarray, trained: np.ndarray, max_len: int | None = None) -> dict[str, np.ndarray]:
  """Next-token arrays of length min(n, max_len); truncation keeps the first cut-off token as the last target."""
  n = len(ids) if max_len is None else min(len(ids), max_len)
  targets = np.zeros(n, np.int32)
  mask = np.zeros(n, np.float32)
  m = min(n, len(ids) - 1)
  targets[:m] = ids[1:m + 1]
  mask[:m] = trained[1:m + 1]
  return {"tokens": np.asarray(ids[:n], np.int32), "targets": targets, "loss_mask": mask}


@dataclasses.dataclass
class Tokenize:
  """The pipeline's map: normalized record -> example dict, or None (counted in `stats`) when it is skipped.

  `overlong` decides what happens to examples longer than `max_len` (the packed row length): "error" raises a
  DataError naming the record, "truncate" keeps the first `max_len` tokens, "skip" drops it. Examples left with
  no trained token (e.g. a prompt filling the whole row) are dropped and counted as `no_loss_tokens`.
  """

  tokenizer: ChatTokenizer
  max_len: int
  overlong: Overlong = "error"
  stats: DataStats = dataclasses.field(default_factory=DataStats)
  on_error: str = "raise"

  def __post_init__(self):
    check_choice("overlong", self.overlong, OVERLONG)

  def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    rid = record.get("_id", "<record>")
    try:
      ids, trained = self.tokenizer.encode(record)
    except chat.TemplateError as e:
      if self.on_error == "raise":
        raise DataError(f"{rid}: {e}") from e
      self.stats.add("bad_record", f"{rid}: {e}")
      return None
    n = len(ids)
    if n > self.max_len:
      reason = f"{rid}: {n} tokens > max_len {self.max_len}"
      if self.overlong == "error":
        raise DataError(f"{reason} (set overlong='truncate' or 'skip')")
      self.stats.add(f"overlong_{self.overlong}", reason)
      if self.overlong == "skip":
        return None
    example = make_example(ids, trained, self.max_len)
    if not example["loss_mask"].any():
      self.stats.add("no_loss_tokens", f"{rid}: no trained token within the first {self.max_len} tokens")
      return None
    return example
