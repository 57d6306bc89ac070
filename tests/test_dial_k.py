"""`python -m phds_jax.dial_k`: one row per k, and the k_pre row is the reference it is compared with."""

import jax
import pytest

from phds_jax import dial_k, models


def test_per_k_report_rows_compare_each_k_with_k_pre():
  cfg = models.tiny(k_pre=2)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 8), 0, cfg.vocab_size)
  rows = dial_k.per_k_report(cfg, params, tokens)
  assert [r["k"] for r in rows] == [1, 2] and [r["expert_share"] for r in rows] == [0.5, 1.0]
  assert rows[-1]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["top1_agree"] == 1.0
  assert rows[0]["kl"] > 0.0 and all(r["ms"] > 0 for r in rows)
