"""Chat templates: render conversations exactly as `transformers.apply_chat_template` does, and find the
character spans of the assistant turns (the only text SFT trains on) for *any* template.

The spans come from incremental rendering rather than from template-specific markers: assistant turn `i` starts
where `render(messages[:i], add_generation_prompt=True)` ends and ends where `render(messages[:i + 1])` ends, both
being prefixes of the full rendering. Trailing whitespace after a turn's end marker (ChatML's newline after
`<|im_end|>`) is not trained. For templates that render a turn differently once later turns follow (Qwen3 drops
the empty `<think>` block from earlier turns), the end falls back to the turn's content plus whatever the template
appends right after it (its end marker).
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, str]

# open-instruct's "tulu" template (Tülu 2/3, OLMoE-Instruct): the eos token closes every assistant turn.
TULU_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}")

# Plain ChatML (Qwen-style, without a default system prompt): `<|im_end|>` closes every turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

BUILTIN_TEMPLATES: dict[str, str] = {"tulu": TULU_TEMPLATE, "chatml": CHATML_TEMPLATE}


class TemplateError(ValueError):
  """A chat template that fails to render a conversation, or whose renderings are not prefixes of each other."""


class _GenerationTag(jinja2.ext.Extension):
  """Accepts transformers' `{% generation %}...{% endgeneration %}` markers and renders their body unchanged."""

  tags = {"generation"}

  def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller) -> str:
    return caller()


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
  # As transformers: no HTML escaping (jinja's own tojson escapes <, >, &, ').
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
  """The environment transformers uses: sandboxed, `trim_blocks`, `lstrip_blocks`, loop controls."""
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(source)


def render(template: str, messages: Sequence[Message], add_generation_prompt: bool = False,
           **variables: Any) -> str:
  """The template applied to `messages`; `variables` are the special tokens (`bos_token`, `eos_token`, ...)."""
  try:
    return compile_template(template).render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                             add_generation_prompt=add_generation_prompt, **variables)
  except jinja2.exceptions.TemplateError as e:
    raise TemplateError(f"chat template failed: {e}") from e


def _turn_end(full: str, start: int, through: str, content: str) -> int:
  """End of the assistant turn starting at `start` in `full`, given its rendering as the last turn (`through`)."""
  if full.startswith(through) and len(through) >= start:
    return len(through)
  # Not a prefix: the turn renders differently with later turns. Find its content, then extend over the text
  # the template puts right after the content (the end marker), as far as both renderings agree.
  at = full.find(content, start)
  pos = through.rfind(content)
  if at < 0 or pos < 0:
    raise TemplateError("chat template renders an assistant turn differently once more turns follow, and its "
                        "content cannot be located; cannot tell which tokens to train on")
  end, suffix = at + len(content), through[pos + len(content):]
  while suffix and end < len(full) and full[end] == suffix[0]:
    end, suffix = end + 1, suffix[1:]
  return end


def assistant_spans(template: str, messages: Sequence[Message], **variables: Any) -> tuple[str, list[tuple[int, int]]]:
  """(full rendering, [(start, end) character span of each assistant turn]) for training-time masking."""
  full = render(template, messages, **variables)
  spans = []
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    try:
      head = render(template, messages[:i], add_generation_prompt=True, **variables)
    except (TemplateError, IndexError, KeyError):  # Some templates cannot render an empty conversation.
      if i:
        raise
      head = ""
    if not full.startswith(head):
      raise TemplateError(f"chat template is not incremental: the rendering up to assistant turn {i} (with the "
                          "generation prompt) is not a prefix of the whole conversation; cannot mask the loss")
    start = len(head)
    end = _turn_end(full, start, render(template, messages[:i + 1], **variables), message["content"])
    end = start + len(full[start:end].rstrip())
    if spans and start < spans[-1][1]:
      raise TemplateError(f"assistant turn {i} overlaps the previous one in the rendering")
    spans.append((start, end))
  return full, spans
