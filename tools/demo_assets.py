r"""The offline demo's data, made from text every machine has: the Python standard library's docstrings.

    python -m tools.demo_assets --out=phds_jax/assets            # corpus, tokenizer, SFT + MC data
    python -m tools.demo_assets --out=phds_jax/assets --pretrain # ... and the pretrained demo base model

Pieces (all deterministic given the Python version; the shipped files were made with CPython 3.11):
  demo_tokenizer/   byte-level BPE (`tokenizers`) with a Tülu-style chat template
  demo_corpus/pretrain.jsonl  {"text": paragraph} records of the docstrings, for `configs/demo_pretrain.py`
  demo_sft/train.jsonl        chats "Complete: <first half of a sentence>" -> "<second half>"
  demo_sft/mc_eval.jsonl      held-out sentences as 4-way multiple choice {"context", "choices", "gold"}
  demo_base/                  HF checkpoint pretrained on the corpus at k_pre=4 (with --pretrain)
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import warnings

from absl import app, flags
import numpy as np
import tokenizers
from tokenizers import decoders, models as tok_models, pre_tokenizers, trainers

from phds_jax.paths import ASSETS_DIR
MODULES = (
    "os json collections functools itertools re string textwrap argparse logging pathlib datetime random "
    "statistics math heapq bisect dataclasses typing unittest inspect shutil subprocess threading queue csv io "
    "pickle copy enum abc contextlib decimal fractions zipfile tarfile gzip socket http.client urllib.parse "
    "email.message html sqlite3 calendar difflib pprint tempfile glob fnmatch hashlib secrets struct codecs "
    "locale platform traceback warnings weakref operator numbers array sched selectors asyncio "
    "concurrent.futures multiprocessing ast dis tokenize doctest timeit pstats mimetypes base64 binascii "
    "colorsys configparser getopt shlex uuid ipaddress smtplib ftplib mailbox imaplib zlib lzma bz2 filecmp "
    "graphlib plistlib xml.etree.ElementTree optparse cmd code pdb profile trace symtable runpy importlib "
    "pkgutil gettext").split()
SPECIAL_TOKENS = ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|pad|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


def stdlib_docstrings() -> list[str]:
  """Docstrings of the listed stdlib modules and their own top-level members, in a fixed order."""
  docs = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for name in MODULES:
      try:
        mod = importlib.import_module(name)
      except ImportError:
        continue
      members = [mod] + [obj for _, obj in inspect.getmembers(mod) if getattr(obj, "__module__", None) == name]
      for obj in members:
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 40:
          docs.append(doc.strip())
  return list(dict.fromkeys(docs))  # de-duplicated, order kept


def sentences(docs: list[str], min_words: int = 6, max_words: int = 24) -> list[str]:
  """Prose sentences of moderate length (no code lines), for the completion task."""
  out = []
  for doc in docs:
    for para in doc.split("\n\n"):
      if ">>>" in para or para.lstrip().startswith(("-", "*", ":")):
        continue
      for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
        words = s.split()
        if min_words <= len(words) <= max_words and s[0].isupper() and s.endswith("."):
          out.append(s)
  return list(dict.fromkeys(out))


def is_heldout(text: str, fraction: float = 0.1) -> bool:
  """Stable split by content hash (independent of ordering and Python's hash seed)."""
  return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) < fraction * 16 ** 8


def split_sentence(s: str) -> tuple[str, str]:
  words = s.split()
  cut = len(words) // 2
  return " ".join(words[:cut]), " ".join(words[cut:])


def train_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 2048) -> None:
  tok = tokenizers.Tokenizer(tok_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  config = dict(tokenizer_class="PreTrainedTokenizerFast", eos_token="<|endoftext|>", pad_token="<|pad|>",
                bos_token=None, add_bos_token=False, model_max_length=512, chat_template=CHAT_TEMPLATE)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=1)


def write_jsonl(path: str, records) -> int:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  n = 0
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
      n += 1
  return n


def make_sft_data(sents: list[str], out_dir: str, seed: int = 0, num_choices: int = 4) -> dict[str, int]:
  """Completion chats for training, and held-out sentences as multiple choice (distractors: other endings)."""
  train = [s for s in sents if not is_heldout(s)]
  held = [s for s in sents if is_heldout(s)]
  chats = [{"messages": [{"role": "user", "content": f"Complete: {a}"}, {"role": "assistant", "content": b}]}
           for a, b in map(split_sentence, train)]
  rng = np.random.default_rng(seed)
  endings = [split_sentence(s)[1] for s in held]
  mc = []
  for i, s in enumerate(held):
    a, b = split_sentence(s)
    others = [endings[j] for j in rng.permutation(len(held)) if j != i and endings[j] != b][:num_choices - 1]
    gold = int(rng.integers(num_choices))
    choices = others[:gold] + [b] + others[gold:]
    mc.append({"context": f"<|user|>\nComplete: {a}\n<|assistant|>\n", "choices": choices, "gold": gold,
               "target_delimiter": ""})
  return {"train": write_jsonl(os.path.join(out_dir, "train.jsonl"), chats),
          "mc_eval": write_jsonl(os.path.join(out_dir, "mc_eval.jsonl"), mc)}


def build(out: str = ASSETS_DIR) -> dict[str, int]:
  docs = stdlib_docstrings()
  train_tokenizer(docs, os.path.join(out, "demo_tokenizer"))
  # All docstrings, held-out sentences included: like a real LLM's benchmark knowledge, the MC items test
  # recall of pretraining text through the SFT format; the SFT set itself never contains them.
  # One record per paragraph, so that packing rows of 256 tokens rarely truncates text.
  paragraphs = [p.strip() for d in docs for p in d.split("\n\n") if len(p.strip()) > 20]
  pretrain = write_jsonl(os.path.join(out, "demo_corpus", "pretrain.jsonl"), ({"text": p} for p in paragraphs))
  counts = make_sft_data(sentences(docs), os.path.join(out, "demo_sft"))
  return {"docstrings": len(docs), "pretrain_paragraphs": pretrain, **counts}


_OUT = flags.DEFINE_string("out", ASSETS_DIR, "Where to write the assets.")
_PRETRAIN = flags.DEFINE_bool("pretrain", False, "Also pretrain the demo base model (configs/demo_pretrain.py).")


def main(argv):
  del argv
  print(build(_OUT.value))
  if _PRETRAIN.value:
    from phds_jax.training.loop import train_and_evaluate  # heavy import only when needed
    from configs import demo_pretrain
    workdir = os.path.join("runs", "demo_pretrain")
    result = train_and_evaluate(demo_pretrain.get_config(), workdir)
    target = os.path.join(_OUT.value, "demo_base")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(result.hf_dir, target)
    print(f"demo base written to {target}")


if __name__ == "__main__":
  app.run(main)
