"""Shared references for the grouped-matmul tests: random operands and per-group numpy loops in float64."""

import jax.numpy as jnp
import numpy as np


def operands(m, g, k, n, dtype=jnp.float32, seed=0):
  """lhs [m,k] and rhs [g,k,n], standard normal."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(m, k)), dtype), jnp.asarray(rng.normal(size=(g, k, n)), dtype)


def np_gmm(lhs, rhs, sizes):
  """Per-group loop in float64; rows past the last group stay zero."""
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out, start = np.zeros((lhs.shape[0], rhs.shape[2])), 0
  for g, size in enumerate(sizes):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out


def np_tgmm(lhs, rhs, sizes):
  """out[g] = lhs_gᵀ rhs_g over group g's rows, float64."""
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out, start = np.zeros((len(sizes), lhs.shape[1], rhs.shape[1])), 0
  for g, size in enumerate(sizes):
    out[g] = lhs[start:start + size].T @ rhs[start:start + size]
    start += size
  return out
