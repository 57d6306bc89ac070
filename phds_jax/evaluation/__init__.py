"""Zero-shot evaluation of one MoE checkpoint at several top-k ("dial k"), with lm-evaluation-harness conventions.

    from phds_jax import hf
    from phds_jax.evaluation import evaluate
    cfg, params = hf.load(path)
    results = evaluate(cfg, params, hf.load_tokenizer(path), ["arc_easy", "jsonl:my.jsonl"], ks=[2, 3, 4],
                       limit=500, out_dir="eval_out")
    results.metric("arc_easy", 2)                 # primary metric at k=2

Modules: `tasks` (registry and specs), `items` (per-task prompt formats: records -> scoring items), `perplexity`
(WikiText / text documents), `records` (task records with their locations, read through phds_jax.data.sources),
`encoding` (tokenization conventions), `engine` (batched scoring and KV-cache generation), `metrics` (decisions,
CIs, agreement; reusable by an experiment driver), `runner` (`evaluate`), `results` (EvalResults), `report`
(results.json, results.md, samples, plots).
"""

from phds_jax.evaluation import metrics
from phds_jax.evaluation.encoding import TextEncoder
from phds_jax.evaluation.engine import Engine
from phds_jax.evaluation.items import GenItem, MCItem, PplDoc
from phds_jax.evaluation.records import EvalDataError
from phds_jax.evaluation.results import EvalResults
from phds_jax.evaluation.runner import evaluate
from phds_jax.evaluation.tasks import REGISTRY, Task, available, get_task

__all__ = [
    "Engine", "EvalDataError", "EvalResults", "GenItem", "MCItem", "PplDoc", "REGISTRY", "Task", "TextEncoder",
    "available", "evaluate", "get_task", "metrics",
]
