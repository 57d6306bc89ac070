"""The k curriculum: distributions, determinism, validation."""

import jax
import numpy as np
import pytest

from configs import demo
from phds_jax import data as data_lib
from phds_jax.models import router
from phds_jax.training import protocol, schedule


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


# ------------------------------------------------------------------ units: steps / epochs of the packed data


def test_switch_point_in_steps_epochs_or_fraction():
  assert schedule.to_fraction(0.9, "fraction", 100, None) == 0.9
  assert schedule.to_fraction(90, "steps", 120, None) == 0.75
  # The paper's "93.9% of one epoch" with 28.25 steps per epoch and 3 epochs of training (85 steps).
  assert schedule.num_steps_for(1000, 3, 28.25) == 85
  assert schedule.to_fraction(0.939, "epochs", 85, 28.25) == pytest.approx(0.939 * 28.25 / 85)
  assert schedule.to_fraction(5, "epochs", 85, 28.25) == 1.0  # past the end: clipped
  assert schedule.num_steps_for(1000, 0, None) == 1000  # num_epochs 0: num_steps as given
  with pytest.raises(schedule.ScheduleError, match="steps per epoch"):
    schedule.to_fraction(0.5, "epochs", 100, None)
  with pytest.raises(schedule.ScheduleError, match="unit"):
    schedule.to_fraction(0.5, "tokens", 100, None)


def test_resolve_units_counts_the_packed_epoch_and_states_the_derivation():
  c = demo.get_config()
  c.num_epochs = 2
  c.schedule.update(dict(switch_at=1.5, switch_unit="epochs", ramp=4, ramp_unit="steps"))
  tok = data_lib.ChatTokenizer.from_dir(c.init.path)
  rows = protocol.count_packed_rows(c, tok)
  # Packing first-fit into 128-token rows holds several chats per row: fewer rows than training records.
  records = sum(1 for _ in open(c.data.path)) * (1 - c.data.validation_fraction)
  assert 0 < rows < records
  out, text = protocol.resolve_units(c, tok, rows_per_epoch=rows)
  spe = rows / c.batch_size
  assert out.num_steps == int(np.ceil(2 * spe)) and out.num_epochs == 0
  assert out.schedule.switch_at == pytest.approx(1.5 * spe / out.num_steps) and out.schedule.switch_unit == "fraction"
  assert out.schedule.ramp == pytest.approx(4 / out.num_steps)
  assert f"{rows} packed rows" in text and f"num_steps {out.num_steps}" in text and "1.5 epochs" in text
  assert c.num_epochs == 2  # the caller's config is untouched
  assert protocol.resolve_for_run(c, tok)[0].num_steps == out.num_steps  # the trainer's path reads the same data
  c.select.update(dict(burn_in_steps=0.5, burn_in_unit="epochs"))  # half an epoch, in steps
  out, text = protocol.resolve_units(c, tok, rows_per_epoch=rows)
  assert out.select.burn_in_steps == round(0.5 * spe) and "selection burn-in" in text
  c.schedule.switch_unit = "weeks"
  with pytest.raises(ValueError, match="switch_unit"):
    protocol.resolve_units(c, tok, rows_per_epoch=rows)


# ----------------------------------------------------------------- load-balance loss normalisation


def test_lb_loss_normalisation_by_k_or_hf_form():
  """Ours divides by k, so a perfectly balanced router scores 1 at every k (a k curriculum does not rescale
  the aux loss); 'hf' is transformers' OLMoE/Qwen form, k times larger."""
  logits = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
  for k in (1, 3):
    ours = router.route(logits, k=k, k_pre=4, mode="soft").lb_loss
    hf_form = router.route(logits, k=k, k_pre=4, mode="soft", lb_norm="hf").lb_loss
    assert float(hf_form) == pytest.approx(k * float(ours), rel=1e-6)
  uniform = router.route(np.zeros((16, 8), np.float32), k=2, k_pre=4, mode="hard")  # equal probabilities
  assert float(uniform.lb_loss) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="lb_norm"):
    router.route(logits, k=2, k_pre=4, lb_norm="sum")
