"""tools/: the asset build scripts live outside the package; what they write must stay readable by it."""

import json

from phds_jax import data as data_lib
from phds_jax import paths
from phds_jax.evaluation import tasks
from tools import demo_assets, toy_data

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _sentences(n: int) -> list[str]:
  """n distinct prose sentences of 8 words, as `demo_assets.sentences` would keep them."""
  return [" ".join([WORDS[i % 12].capitalize()] + [WORDS[(i * 7 + j) % 12] for j in range(6)] + [f"w{i}."])
          for i in range(n)]


def test_the_build_scripts_write_where_the_package_reads():
  assert demo_assets.ASSETS_DIR == paths.ASSETS_DIR
  assert toy_data.OUT == paths.join(paths.ASSETS_DIR, "demo_power")


def test_sentence_filter_and_split():
  docs = ["Returns the value of the key in this mapping.\n\n>>> code line that is skipped.",
          "too short.", "A sentence that ends without a period"]
  assert demo_assets.sentences(docs) == ["Returns the value of the key in this mapping."]
  first, second = demo_assets.split_sentence("one two three four five six")
  assert (first, second) == ("one two three", "four five six")


def test_sft_and_mc_files_are_read_by_the_training_and_evaluation_readers(tmp_path):
  sents = _sentences(200)
  counts = demo_assets.make_sft_data(sents, str(tmp_path))
  held = sum(demo_assets.is_heldout(s) for s in sents)
  assert counts == {"train": len(sents) - held, "mc_eval": held} and 0 < held < len(sents)

  source = data_lib.open_source(str(tmp_path / "train.jsonl"))  # the training pipeline's reader
  assert len(source) == counts["train"]
  record = source[0]
  assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
  assert record["messages"][0]["content"].startswith("Complete: ")

  task = tasks.get_tasks(["jsonl:" + str(tmp_path / "mc_eval.jsonl")])[0]  # the evaluator's reader
  items = task.load()
  assert len(items) == counts["mc_eval"]
  with open(tmp_path / "mc_eval.jsonl") as f:
    first = json.loads(f.readline())
  start, end = demo_assets.split_sentence(next(s for s in sents if demo_assets.is_heldout(s)))
  assert len(first["choices"]) == 4 and f"Complete: {start}" in first["context"]
  assert first["choices"][first["gold"]] == end
