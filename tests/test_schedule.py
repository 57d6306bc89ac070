"""The k curriculum: distributions, determinism, validation."""

import numpy as np
import pytest

from phds_jax import schedule


def test_uniform_is_uniform_and_deterministic():
  s = schedule.KSchedule(k_train=(4, 5, 6, 7, 8), mode="uniform", total_steps=1000, seed=3)
  hist = schedule.histogram(s, range(1000), num_microbatches=4)
  counts = np.array([hist[k] for k in (4, 5, 6, 7, 8)])
  assert counts.sum() == 4000
  assert np.all(np.abs(counts / 4000 - 0.2) < 0.03), counts
  # Pure function of (seed, step, microbatch): the same on every call (other hosts, after a resume).
  assert schedule.ks_for_step(s, 17, 4) == schedule.ks_for_step(s, 17, 4)
  other = schedule.KSchedule(k_train=(4, 5, 6, 7, 8), total_steps=1000, seed=4)
  assert [schedule.ks_for_step(s, i, 4) for i in range(20)] != [schedule.ks_for_step(other, i, 4) for i in range(20)]


def test_per_step_granularity_shares_k_across_microbatches():
  s = schedule.KSchedule(k_train=(2, 3, 4), granularity="step", total_steps=50)
  for step in range(50):
    assert len(set(schedule.ks_for_step(s, step, 8))) == 1
  per_mb = schedule.KSchedule(k_train=(2, 3, 4), granularity="microbatch", total_steps=50)
  assert any(len(set(schedule.ks_for_step(per_mb, step, 8))) > 1 for step in range(50))


def test_hard_switch_curriculum():
  s = schedule.KSchedule(k_train=(2, 3, 4), mode="curriculum", anchor=2, switch_at=0.9, total_steps=100)
  np.testing.assert_allclose(schedule.probabilities(s, 0), [1 / 3] * 3)
  np.testing.assert_allclose(schedule.probabilities(s, 89), [1 / 3] * 3)
  np.testing.assert_allclose(schedule.probabilities(s, 90), [1, 0, 0])
  assert all(schedule.ks_for_step(s, step, 4) == [2] * 4 for step in range(90, 100))


def test_linear_ramp_curriculum():
  s = schedule.KSchedule(k_train=(4, 6, 8), mode="curriculum", anchor=4, switch_at=0.5, ramp=0.25,
                         total_steps=100)
  np.testing.assert_allclose(schedule.probabilities(s, 50), [1 / 3] * 3)
  mid = schedule.probabilities(s, 62.5)
  np.testing.assert_allclose(mid, [0.5 / 3 + 0.5, 0.5 / 3, 0.5 / 3])
  np.testing.assert_allclose(schedule.probabilities(s, 75), [1, 0, 0])
  np.testing.assert_allclose(schedule.probabilities(s, 99), [1, 0, 0])


def test_anchor_outside_k_train_gets_its_own_branch():
  s = schedule.KSchedule(k_train=(4, 6, 8), mode="curriculum", anchor=5, switch_at=0.5, total_steps=10)
  assert s.levels == (4, 5, 6, 8)
  np.testing.assert_allclose(schedule.probabilities(s, 0), [1 / 3, 0, 1 / 3, 1 / 3])
  assert schedule.ks_for_step(s, 9, 2) == [5, 5]


def test_custom_probs_and_fixed():
  s = schedule.KSchedule(k_train=(2, 4), probs=(0.0, 1.0), total_steps=10)
  assert all(schedule.ks_for_step(s, i, 3) == [4, 4, 4] for i in range(10))
  f = schedule.fixed(3, total_steps=5)
  schedule.validate(f, k_pre=4)
  assert f.levels == (3,) and schedule.ks_for_step(f, 2, 2) == [3, 3]


@pytest.mark.parametrize("kwargs, match", [
    (dict(k_train=()), "empty"),
    (dict(k_train=(0, 2)), "outside"),
    (dict(k_train=(2, 9)), "outside"),
    (dict(k_train=(2, 2)), "repeated"),
    (dict(k_train=(2, 4), mode="curriculum"), "anchor"),
    (dict(k_train=(3, 4), mode="curriculum", anchor=2), "range"),
    (dict(k_train=(2, 4), switch_at=1.5), "switch_at"),
    (dict(k_train=(2, 4), ramp=-0.1), "ramp"),
    (dict(k_train=(2, 4), probs=(0.5, 0.6)), "probs"),
    (dict(k_train=(2, 4), mode="fixed"), "exactly one"),
    (dict(k_train=(2, 4), granularity="token"), "granularity"),
    (dict(k_train=(2, 4), mode="annealed"), "mode"),
])
def test_validation_errors(kwargs, match):
  with pytest.raises(schedule.ScheduleError, match=match):
    schedule.validate(schedule.KSchedule(**kwargs), k_pre=8)
