r"""The toy comparison's data (phds_jax/assets/demo_power/): an SFT split with enough held-out items for power.

    python -m tools.toy_data   # rewrites phds_jax/assets/demo_power/ (deterministic, offline)

The shipped demo SFT set (demo_sft/) holds out only 295 sentences, so its accuracy intervals are ±0.05 and a
gap of a few points cannot be seen. Here the same stdlib-docstring sentences (6..40 words, the demo base saw
them all in pretraining) are split three ways by a content hash: SFT training chats, a validation MC set for
checkpoint and anchor selection, and a test MC set of >= 1,000 items (a 95% CI of about ±0.03) plus the test
sentences as plain text for a WikiText-style perplexity. No sentence is in more than one split, and distractors
are endings of other sentences of the same split, so nothing the SFT sees appears in a test item. The split
depends on the Python version's docstrings; the files are committed, so runs never re-derive them.
"""

from __future__ import annotations

import hashlib
import os

from absl import app
import numpy as np

from tools import demo_assets

OUT = os.path.join(demo_assets.ASSETS_DIR, "demo_power")
TEST_FRACTION, VALID_FRACTION = 0.40, 0.10  # of the sentences; the rest is SFT data
SALT = "demo_power"


def split_of(sentence: str) -> str:
  """'test' | 'valid' | 'train' by a salted content hash (independent of order and of Python's hash seed)."""
  u = int(hashlib.sha1(f"{SALT}:{sentence}".encode()).hexdigest()[:8], 16) / 16 ** 8
  return "test" if u < TEST_FRACTION else "valid" if u < TEST_FRACTION + VALID_FRACTION else "train"


def mc_items(sents: list[str], seed: int, num_choices: int = 4) -> list[dict]:
  """4-way completion items: the first half of a sentence, its own ending among 3 endings of other sentences."""
  rng = np.random.default_rng(seed)
  endings = [demo_assets.split_sentence(s)[1] for s in sents]
  out = []
  for i, s in enumerate(sents):
    a, b = demo_assets.split_sentence(s)
    others = []
    for j in rng.permutation(len(sents)):
      if j != i and endings[j] != b and endings[j] not in others:
        others.append(endings[j])
      if len(others) == num_choices - 1:
        break
    gold = int(rng.integers(num_choices))
    out.append({"context": f"<|user|>\nComplete: {a}\n<|assistant|>\n", "choices": others[:gold] + [b] + others[gold:],
                "gold": gold, "target_delimiter": ""})
  return out


def build(out: str = OUT) -> dict[str, int]:
  sents = demo_assets.sentences(demo_assets.stdlib_docstrings(), min_words=6, max_words=40)
  parts = {name: [s for s in sents if split_of(s) == name] for name in ("train", "valid", "test")}
  chats = [{"messages": [{"role": "user", "content": f"Complete: {a}"}, {"role": "assistant", "content": b}]}
           for a, b in map(demo_assets.split_sentence, parts["train"])]
  counts = {"train": demo_assets.write_jsonl(os.path.join(out, "train.jsonl"), chats),
            "mc_valid": demo_assets.write_jsonl(os.path.join(out, "mc_valid.jsonl"),
                                                 mc_items(parts["valid"], seed=1)),
            "mc_test": demo_assets.write_jsonl(os.path.join(out, "mc_test.jsonl"),
                                                mc_items(parts["test"], seed=2))}
  # Perplexity documents: the test sentences, 20 to a paragraph-like document (rolling windows score them).
  docs = [" ".join(parts["test"][i:i + 20]) for i in range(0, len(parts["test"]), 20)]
  with open(os.path.join(out, "ppl_test.txt"), "w") as f:
    f.write("\n".join(docs) + "\n")
  counts["ppl_docs"] = len(docs)
  return counts


def main(argv):
  del argv
  print(build())


if __name__ == "__main__":
  app.run(main)
