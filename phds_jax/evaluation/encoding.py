"""Tokenization for scoring, with lm-evaluation-harness conventions.

* Special tokens: a text is encoded as `tokenizer.encode(text, add_special_tokens=True)` would encode it, except
  that special tokens the post-processor appends *after* the text (an EOS) are left out: the model must not see an
  end-of-text marker before the continuation it scores. So a BOS appears exactly when the tokenizer's
  post-processor adds one (Llama-style), and never for GPT-NeoX / Qwen-style byte-level tokenizers.
* (context, continuation) pairs (`encode_pair`): trailing whitespace of the context is moved to the front of the
  continuation (so "Answer:" + " yes" is scored the same as "Answer: " + "yes"); then `whole = encode(context +
  continuation)` and `ctx = encode(context)`, and the continuation's tokens are `whole[len(ctx):]`. When `ctx` is
  not a prefix of `whole` (a merge across the boundary), the two parts are encoded separately and the
  continuation is `encode(continuation)` without special tokens, so the scored tokens always spell the
  continuation exactly. An empty context becomes `[prefix_token_id]` (BOS, else EOS), as in the harness; for a
  checkpoint whose config names neither, a special end/begin-of-text token of the tokenizer (`<|endoftext|>`,
  `</s>`, ...: the demo checkpoints' case), else an error that asks for `prefix_token_id`.
* Rolling windows (`rolling_windows`): a document is split into disjoint prediction windows of at most
  `max_length` tokens; the first is conditioned on `[prefix_token_id]`, each later one on the single token before
  it (the harness's `loglikelihood_rolling` with context_len=1), so every token is predicted exactly once.
"""

from __future__ import annotations

import json
from typing import Sequence

import tokenizers

Ids = list[int]


def _special_prefix(tokenizer: tokenizers.Tokenizer) -> Ids:
  """The ids the post-processor puts in front of a single sequence (e.g. [BOS]); [] for most byte-level BPEs."""
  plain = tokenizer.encode("a", add_special_tokens=False).ids
  full = tokenizer.encode("a", add_special_tokens=True)
  for i in range(len(full.ids) - len(plain) + 1):
    if full.ids[i:i + len(plain)] == plain:
      return list(full.ids[:i])
  # An unusual post-processor that rewrites the text's ids: keep its leading special tokens.
  lead = []
  for token_id, special in zip(full.ids, full.special_tokens_mask):
    if not special:
      break
    lead.append(token_id)
  return lead


# Special tokens that mark a document boundary in common tokenizers, in order of preference: what a model saw
# before a document's first token when its config names no bos/eos id.
BOUNDARY_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "<|begin_of_text|>", "</s>", "<s>", "<eos>", "<bos>")


def boundary_token(tokenizer: tokenizers.Tokenizer) -> int | None:
  """The id of the tokenizer's first special token in BOUNDARY_TOKENS, or None."""
  special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
  return next((special[name] for name in BOUNDARY_TOKENS if name in special), None)


def _config_token(hf_extra_json: str | None, key: str) -> int | None:
  if not hf_extra_json:
    return None
  value = json.loads(hf_extra_json).get(key)
  if isinstance(value, list):
    value = value[0] if value else None
  return None if value is None else int(value)


class TextEncoder:
  """A `tokenizers.Tokenizer` plus the token conventions above; all scoring code encodes through it."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, prefix_token_id: int | None = None,
               eos_token_id: int | None = None, hf_extra_json: str | None = None):
    """`prefix_token_id` conditions empty contexts and the first rolling window: by default the post-processor's
    BOS, else the model config's `bos_token_id`, else its `eos_token_id` (HF configs keep them in `hf_extra_json`),
    else the tokenizer's special boundary token (`boundary_token`). `eos_token_id` (default: the config's, else
    that boundary token) stops generation.
    """
    self.tokenizer = tokenizer
    self.special_prefix = _special_prefix(tokenizer)
    boundary = boundary_token(tokenizer)
    config_eos = _config_token(hf_extra_json, "eos_token_id")
    self.eos_token_id = next((c for c in (eos_token_id, config_eos, boundary) if c is not None), None)
    if prefix_token_id is not None and not 0 <= prefix_token_id < tokenizer.get_vocab_size():
      raise ValueError(f"prefix_token_id={prefix_token_id} is outside the tokenizer's vocabulary "
                       f"[0, {tokenizer.get_vocab_size()})")
    if prefix_token_id is None:
      candidates = [self.special_prefix[-1] if self.special_prefix else None,
                    _config_token(hf_extra_json, "bos_token_id"), config_eos, boundary]
      prefix_token_id = next((c for c in candidates if c is not None), None)
    self.prefix_token_id = prefix_token_id

  def encode(self, text: str, add_special_tokens: bool = True) -> Ids:
    ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
    return self.special_prefix + ids if add_special_tokens else ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)

  def _prefix(self) -> Ids:
    if self.prefix_token_id is None:
      raise ValueError("an empty context (and a perplexity document's first window) needs a prefix token: the "
                       "tokenizer adds no BOS, has no end-of-text token and the model config names no bos/eos "
                       "token; pass prefix_token_id (CLI: --prefix_token_id=ID)")
    return [self.prefix_token_id]

  def encode_pair(self, context: str, continuation: str) -> tuple[Ids, Ids]:
    """(context ids, continuation ids) of one log-likelihood request; see the module docstring."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
      context, continuation = context[:-n_space], context[-n_space:] + continuation
    if not context:
      ctx = self.special_prefix or self._prefix()
      cont = self.encode(continuation, add_special_tokens=False)
    else:
      whole, ctx = self.encode(context + continuation), self.encode(context)
      if whole[:len(ctx)] == ctx:
        cont = whole[len(ctx):]
      else:
        cont = self.encode(continuation, add_special_tokens=False)
    if not cont:
      raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return ctx, cont

  def rolling_windows(self, ids: Sequence[int], max_length: int) -> list[tuple[Ids, Ids]]:
    """Disjoint (context, prediction) windows covering `ids` (the document's tokens, no special tokens)."""
    ids = list(ids)
    if not ids:
      return []
    windows = [(self._prefix(), ids[:max_length])]
    for start in range(max_length, len(ids), max_length):
      windows.append(([ids[start - 1]], ids[start:start + max_length]))
    return windows
