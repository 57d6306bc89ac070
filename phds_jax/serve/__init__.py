"""Serving one PHDS checkpoint at any k: on-device generation, continuous batching, an OpenAI-style server.

    from phds_jax.serve import SamplingParams, generate
    new_ids = generate(cfg, params, [prompt_ids], k=2, sampling=SamplingParams(max_new_tokens=32))

`python -m phds_jax.serve --checkpoint=DIR` starts the HTTP server (app.py); this package's import stays light
(no web stack) so that notebooks and the evaluator can generate without it.
"""

from phds_jax.serve.engine import generate, time_decode
from phds_jax.serve.sampling import SamplingParams

__all__ = ["SamplingParams", "generate", "time_decode"]
