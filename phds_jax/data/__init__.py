"""SFT data: sources -> chat templates + loss masks -> packed, checkpointable Grain batches (see pipeline.py)."""

from phds_jax.data.chat import BUILTIN_TEMPLATES, CHATML_TEMPLATE, TULU_TEMPLATE, TemplateError, assistant_spans, render
from phds_jax.data.errors import DataError, DataStats
from phds_jax.data.formats import normalize
from phds_jax.data.pipeline import BATCH_SPEC, DataConfig, as_config, build_dataset, load_source, make_dataset
from phds_jax.data.sources import (ConcatSource, JsonArraySource, JsonlSource, ParquetSource, SubsetSource,
                                   TextFileSource, TfdsSource, holdout_mask, holdout_split, open_source)
from phds_jax.data.tokenize import ChatTokenizer, Tokenize, make_example

__all__ = [
    "BATCH_SPEC", "BUILTIN_TEMPLATES", "CHATML_TEMPLATE", "ChatTokenizer", "ConcatSource", "DataConfig", "DataError",
    "DataStats", "JsonArraySource", "JsonlSource", "ParquetSource", "SubsetSource", "TULU_TEMPLATE", "TemplateError",
    "TextFileSource", "TfdsSource", "Tokenize", "as_config", "assistant_spans", "build_dataset", "holdout_mask",
    "holdout_split", "load_source", "make_dataset", "make_example", "normalize", "open_source", "render",
]
