"""Evaluate one checkpoint at several top-k: `python -m phds_jax.eval --checkpoint=DIR --tasks=... --out=DIR`.

--checkpoint is a Hugging Face directory (config.json + safetensors + tokenizer.json) or a phds_jax params
checkpoint (model_config.json + params/; pass --tokenizer unless tokenizer.json sits beside it).

Task specs (comma-separated in --tasks); nothing is ever downloaded:
  NAME                   a registered task read from a prepared tfds dataset under --data_dir: arc_easy,
                         arc_challenge, boolq, hellaswag, piqa, winogrande, openbookqa, triviaqa (generation)
  NAME:PATH              the same task from a local .jsonl / .json / .parquet file in the Hugging Face schema of
                         the harness's dataset (sciq, siqa and wikitext exist only in this form)
  NAME:tfds:DATASET/SPLIT  another prepared tfds dataset, e.g. boolq:tfds:super_glue/boolq/validation
  jsonl:PATH             your own multiple choice, one JSON object per line:
                           {"context": "The sky is", "choices": ["blue", "green"], "gold": 0}
                         each choice is scored as log p(" " + choice | context); optional "target_delimiter"
                         replaces the " " (use "" when the context ends in a chat template's assistant header)
  ppl:PATH               perplexity of plain text: a .txt file is one document; .jsonl / .parquet records give one
                         document each from their "text" field (rolling windows of --max_length tokens)

Writes OUT/results.json (every metric with a 95% bootstrap CI, per k), results.md, samples/<task>_k<k>.jsonl,
accuracy_vs_k.png (one panel per kind of task present) and agreement.png. Every task is loaded before any
scoring starts; if a later task fails, the finished ones are still written.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags, logging

from phds_jax import checkpoint as ckpt_lib
from phds_jax import cli, console, hf
from phds_jax.evaluation import evaluate
from phds_jax.evaluation.tasks import get_tasks

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> flags.FlagValues:
  """Defines the CLI flags on `fv` (only when run as a script, so importing this module defines nothing and
  cannot clash with other entry points' flags in one process; tests pass a fresh FlagValues)."""
  kw = {"flag_values": fv}
  flags.DEFINE_string("checkpoint", None, "HF checkpoint dir or phds_jax params checkpoint dir.", required=True,
                      **kw)
  flags.DEFINE_string("tokenizer", None, "tokenizer.json file or directory (default: the checkpoint's).", **kw)
  flags.DEFINE_list("tasks", ["arc_easy"], "Comma-separated task specs.", **kw)
  flags.DEFINE_list("ks", None, "Top-k levels to evaluate (default 1..k_pre).", **kw)
  flags.DEFINE_integer("limit", None, "Evaluate the first N documents of each task.", **kw)
  flags.DEFINE_integer("batch_size", 8, "Rows per model call.", **kw)
  flags.DEFINE_integer("max_length", None, "Longest scored window (default: max_position_embeddings).", **kw)
  flags.DEFINE_integer("min_bucket", 16, "Shortest padded length (powers of two above it; fewer compiles).", **kw)
  flags.DEFINE_string("out", None, "Output directory.", required=True, **kw)
  flags.DEFINE_string("data_dir", None, "tfds data_dir holding prepared datasets.", **kw)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Parameter and compute dtype.", **kw)
  flags.DEFINE_integer("n_boot", 1000, "Bootstrap resamples for the CIs.", **kw)
  flags.DEFINE_integer("seed", 0, "Bootstrap seed.", **kw)
  flags.DEFINE_integer("max_new_tokens", 32, "Generation length limit (TriviaQA).", **kw)
  flags.DEFINE_bool("plots", True, "Write PNG plots.", **kw)
  flags.DEFINE_integer("prefix_token_id", None, "Token that conditions an empty context and the first window of "
                       "a perplexity document (default: the tokenizer's BOS, else the config's bos/eos id, else "
                       "the tokenizer's <|endoftext|>-style token).", **kw)
  return fv


def load_model(checkpoint: str, tokenizer: str | None = None, dtype: str | None = None):
  """(cfg, params, tokenizers.Tokenizer) from either checkpoint kind; `dtype` sets param and compute dtype."""
  try:
    cfg, params = ckpt_lib.load_model(checkpoint, dtype=dtype)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from e
  return cfg, params, hf.load_tokenizer(tokenizer or checkpoint)


def run(fv: flags.FlagValues = FLAGS):
  """Loads the checkpoint named by the parsed flags `fv`, evaluates it and writes --out; returns EvalResults."""
  try:
    get_tasks(fv.tasks)  # spec typos fail before the checkpoint loads
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  cfg, params, tokenizer = load_model(fv.checkpoint, fv.tokenizer, fv.dtype)
  ks = [int(k) for k in fv.ks] if fv.ks else None
  return evaluate(cfg, params, tokenizer, fv.tasks, ks, limit=fv.limit, batch_size=fv.batch_size,
                  max_length=fv.max_length, min_bucket=fv.min_bucket, data_dir=fv.data_dir, out_dir=fv.out,
                  n_boot=fv.n_boot, seed=fv.seed, max_new_tokens=fv.max_new_tokens, plots=fv.plots,
                  meta={"checkpoint": str(Path(fv.checkpoint).absolute())}, prefix_token_id=fv.prefix_token_id)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(FLAGS)  # bad data / checkpoints are cli.UserErrors: one line, exit 2 (--debug: traceback)
  logging.info("wrote %s", FLAGS.out)
  print((Path(FLAGS.out) / "results.md").read_text())


if __name__ == "__main__":
  console.quiet_backend_probe()
  define_flags()
  cli.run(main)
