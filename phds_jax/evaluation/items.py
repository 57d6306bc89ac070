"""Per-task document -> scoring item conversion: the exact zero-shot prompt formats.

Formats follow lm-evaluation-harness (zero-shot, target delimiter " ", so each continuation is " " + choice):

| task | context | choices (gold) |
|---|---|---|
| arc_easy, arc_challenge | `Question: {question}\\nAnswer:` | choices.text (index of answerKey in choices.label) |
| boolq | `{passage}\\nQuestion: {question}?\\nAnswer:` | ["no", "yes"] (label / answer) |
| hellaswag | `preprocess({activity_label}: {ctx_a} {ctx_b.capitalize()})` | preprocess(endings) (label) |
| piqa | `Question: {goal}\\nAnswer:` | [sol1, sol2] (label) |
| sciq | `{support.lstrip()}\\nQuestion: {question}\\nAnswer:` | [distractor1..3, correct_answer] (3) |
| winogrande | sentence[:blank] + option (one context per option) | the shared suffix " " + sentence[blank+1:].strip() |
| siqa | `Q: {context} {question}\\nA:` | [answerA, answerB, answerC] (int(label) - 1) |
| openbookqa | `{question_stem}` | choices.text (index of answerKey in choices.label) |
| triviaqa (generation) | `Question: {question}?\\nAnswer:` | greedy answer vs answer.aliases |
| jsonl:PATH | `{context}` | choices (gold) |

* SciQ: the harness lists the choices in this fixed order (correct answer last) rather than shuffling them; we do
  the same, so a tie (lowest index wins) never favours the gold answer.
* HellaSwag preprocess: strip, " [title]" -> ". ", drop "[...]" tags, "  " -> " ". tfds' hellaswag only has the
  joined `context` (ctx_a + " " + ctx_b): ctx_b is taken to be the trailing fragment after the last sentence end
  when it starts lower-case (activitynet style), and is capitalised as the harness does; use the HF parquet/JSONL
  (`hellaswag:PATH`) for exact harness prompts.
* TriviaQA: greedy decoding with the KV cache, stopped at "\\n" (`evaluate(until=...)`; the harness also stops at
  "." and ",", which cuts answers such as "St. Louis"), scored by SQuAD-normalised exact match against any alias
  (`metrics.normalize_answer`). Harness split: rc.nocontext validation.
* WinoGrande is scored by partial evaluation: each option fills the blank in its own context and only the common
  suffix is scored; acc_norm / acc_bytes equal acc here (same continuation), so only acc is reported.
* Field names: each converter reads the Hugging Face schema (the harness's datasets, as local JSONL/parquet) and
  the tfds schema (ClassLabels as ints, e.g. ARC answerKey, WinoGrande label in {0, 1}, bool_q `answer`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from phds_jax.evaluation.records import Doc, EvalDataError, need

DELIMITER = " "


@dataclasses.dataclass(frozen=True)
class MCItem:
  """One multiple-choice question: choice i is scored as log p(continuations[i] | contexts[i])."""

  contexts: tuple[str, ...]
  continuations: tuple[str, ...]
  choices: tuple[str, ...]  # choice texts without the delimiter (acc_norm / acc_bytes lengths)
  gold: int


@dataclasses.dataclass(frozen=True)
class PplDoc:
  """A perplexity document: `text` is scored; `words` / `nbytes` may count another form of it (WikiText counts
  the original page, scores the detokenized one)."""

  text: str
  words: int
  nbytes: int


@dataclasses.dataclass(frozen=True)
class GenItem:
  prompt: str
  answers: tuple[str, ...]


def _mc(task: str, where: str, context: str, choices: Sequence[Any], gold: Any,
        delimiter: str = DELIMITER) -> MCItem:
  """A standard item (one context, delimiter + choice continuations) after validating choices and gold."""
  if not isinstance(context, str):
    raise EvalDataError(f"{where}: {task}: context must be a string, got {type(context).__name__}")
  if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
    raise EvalDataError(f"{where}: {task}: choices must be a list of >= 2 strings, got {choices!r}")
  if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
    raise EvalDataError(f"{where}: {task}: gold must be an int index into {len(choices)} choices, got {gold!r}")
  if not isinstance(delimiter, str):
    raise EvalDataError(f"{where}: {task}: target_delimiter must be a string, got {delimiter!r}")
  return MCItem((context,) * len(choices), tuple(delimiter + c for c in choices), tuple(choices), gold)


def _index(labels: Sequence[Any], key: Any, where: str, task: str) -> int:
  key = key.strip() if isinstance(key, str) else key
  if key not in labels:
    raise EvalDataError(f"{where}: {task}: answerKey {key!r} is not among choice labels {list(labels)}")
  return list(labels).index(key)


def _int(value: Any, where: str, task: str, field: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError) as e:
    raise EvalDataError(f"{where}: {task}: field {field!r} must be an integer, got {value!r}") from e


def arc(doc: Doc, where: str, task: str = "arc") -> MCItem:
  choices = need(doc, "choices", where, task)
  texts, labels = need(choices, "text", where, task), need(choices, "label", where, task)
  gold = _index(labels, need(doc, "answerKey", where, task), where, task)
  return _mc(task, where, f"Question: {need(doc, 'question', where, task)}\nAnswer:", texts, gold)


def boolq(doc: Doc, where: str, task: str = "boolq") -> MCItem:
  label = doc["answer"] if doc.get("label") is None and "answer" in doc else need(doc, "label", where, task)
  context = f"{need(doc, 'passage', where, task)}\nQuestion: {need(doc, 'question', where, task)}?\nAnswer:"
  return _mc(task, where, context, ["no", "yes"], _int(label, where, task, "label"))


def _hellaswag_clean(text: str) -> str:
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def _split_tfds_context(ctx: str) -> tuple[str, str]:
  """(ctx_a, ctx_b) from tfds' joined context; see the module docstring."""
  m = re.match(r"^(.*[.!?])\s+([^.!?]+)$", ctx, re.S)
  if m and m.group(2)[:1].islower():
    return m.group(1), m.group(2)
  return ctx, ""


def hellaswag(doc: Doc, where: str, task: str = "hellaswag") -> MCItem:
  if "ctx_a" in doc:
    ctx_a, ctx_b = need(doc, "ctx_a", where, task), doc.get("ctx_b") or ""
  else:
    ctx_a, ctx_b = _split_tfds_context(need(doc, "context", where, task))
  query = _hellaswag_clean(f"{need(doc, 'activity_label', where, task)}: {ctx_a} {ctx_b.capitalize()}")
  endings = [_hellaswag_clean(e) for e in need(doc, "endings", where, task)]
  return _mc(task, where, query, endings, _int(need(doc, "label", where, task), where, task, "label"))


def piqa(doc: Doc, where: str, task: str = "piqa") -> MCItem:
  choices = [need(doc, "sol1", where, task), need(doc, "sol2", where, task)]
  return _mc(task, where, f"Question: {need(doc, 'goal', where, task)}\nAnswer:", choices,
             _int(need(doc, "label", where, task), where, task, "label"))


def sciq(doc: Doc, where: str, task: str = "sciq") -> MCItem:
  support = (doc.get("support") or "").lstrip()
  choices = [need(doc, f, where, task) for f in ("distractor1", "distractor2", "distractor3", "correct_answer")]
  return _mc(task, where, f"{support}\nQuestion: {need(doc, 'question', where, task)}\nAnswer:", choices, 3)


def winogrande(doc: Doc, where: str, task: str = "winogrande") -> MCItem:
  sentence = need(doc, "sentence", where, task)
  if "_" not in sentence:
    raise EvalDataError(f"{where}: {task}: sentence has no '_' blank: {sentence!r}")
  if "answer" in doc and doc["answer"] not in (None, ""):
    gold = _int(doc["answer"], where, task, "answer") - 1  # HF: "1" / "2"
  else:
    gold = _int(need(doc, "label", where, task), where, task, "label")  # tfds ClassLabel: 0 / 1
  blank = sentence.index("_")
  options = (need(doc, "option1", where, task), need(doc, "option2", where, task))
  if gold not in (0, 1):
    raise EvalDataError(f"{where}: {task}: answer must be 1 or 2, got {gold + 1}")
  suffix = DELIMITER + sentence[blank + 1:].strip()
  return MCItem(tuple(sentence[:blank] + o for o in options), (suffix, suffix), options, gold)


def siqa(doc: Doc, where: str, task: str = "siqa") -> MCItem:
  context = f"Q: {need(doc, 'context', where, task)} {need(doc, 'question', where, task)}\nA:"
  choices = [need(doc, f, where, task) for f in ("answerA", "answerB", "answerC")]
  return _mc(task, where, context, choices, _int(need(doc, "label", where, task), where, task, "label") - 1)


def openbookqa(doc: Doc, where: str, task: str = "openbookqa") -> MCItem:
  if "question_stem" in doc:
    choices = need(doc, "choices", where, task)
    texts, labels = need(choices, "text", where, task), need(choices, "label", where, task)
    stem = doc["question_stem"]
  else:  # tfds: question {stem, choice_A..D}, answerKey a ClassLabel int
    q = need(doc, "question", where, task)
    stem = need(q, "stem", where, task)
    texts, labels = [need(q, f"choice_{c}", where, task) for c in "ABCD"], list(range(4))
  gold = _index(labels, need(doc, "answerKey", where, task), where, task)
  return _mc(task, where, stem, texts, gold)


def generic_mc(doc: Doc, where: str, task: str = "jsonl") -> MCItem:
  """`{"context": str, "choices": [str, ...], "gold": int, "target_delimiter"?: str}`; continuations are
  delimiter + choice (default " "; chat-formatted contexts ending in the assistant header use "")."""
  return _mc(task, where, need(doc, "context", where, task), need(doc, "choices", where, task),
             need(doc, "gold", where, task), doc.get("target_delimiter", DELIMITER))


def triviaqa(doc: Doc, where: str, task: str = "triviaqa") -> GenItem:
  answer = need(doc, "answer", where, task)
  aliases = need(answer, "aliases", where, task) if isinstance(answer, dict) else answer
  if isinstance(aliases, str):
    aliases = [aliases]
  if not aliases or not all(isinstance(a, str) for a in aliases):
    raise EvalDataError(f"{where}: {task}: answer aliases must be a non-empty list of strings")
  return GenItem(f"Question: {need(doc, 'question', where, task)}?\nAnswer:", tuple(aliases))
