"""Zero-shot evaluation of one MoE checkpoint at several top-k ("dial k"), with lm-evaluation-harness conventions.

    from phds_jax import hf
    from phds_jax.evaluation import evaluate
    cfg, params = hf.load(path)
    results = evaluate(cfg, params, hf.load_tokenizer(path), ["arc_easy", "jsonl:my.jsonl"], ks=[2, 3, 4],
                       limit=500, out_dir="eval_out")
    results.metric("arc_easy", 2)                 # primary metric at k=2

Modules: `tasks` (registry and specs), `formats` (prompt formats), `perplexity` (WikiText / text documents),
`sources` (JSONL / parquet / tfds readers), `encoding` (tokenization conventions), `engine` (batched scoring and
KV-cache generation), `metrics` (decisions, CIs, agreement; reusable by an experiment driver), `runner`
(`evaluate`), `report` (results.json, results.md, samples, plots).
"""

from phds_jax.evaluation import metrics
from phds_jax.evaluation.encoding import TextEncoder
from phds_jax.evaluation.engine import Engine
from phds_jax.evaluation.formats import GenItem, MCItem, PplDoc
from phds_jax.evaluation.runner import EvalResults, evaluate
from phds_jax.evaluation.sources import EvalDataError
from phds_jax.evaluation.tasks import REGISTRY, Task, available, get_task

__all__ = [
    "Engine", "EvalDataError", "EvalResults", "GenItem", "MCItem", "PplDoc", "REGISTRY", "Task", "TextEncoder",
    "available", "evaluate", "get_task", "metrics",
]
