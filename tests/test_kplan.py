"""The k plan (phds_jax/kplan.py): levels, slots, default ks and the one k range rule, checked once."""

import numpy as np
import pytest

from configs import demo
from phds_jax import kplan, models
from phds_jax.models import router
from phds_jax.training import schedule
from tests.conftest import override


def test_range_rule_is_the_routers():
  assert kplan.ks_outside is router.ks_outside
  assert kplan.ks_outside([0, 1, 4, 5, 2.0, True, np.int64(3)], 4) == [0, 5, 2.0, True]


def test_default_and_eval_ks():
  assert kplan.default_ks(4) == [1, 2, 3, 4]
  assert kplan.default_ks(2, (3, 1)) == [1, 2, 3]
  assert kplan.eval_ks(None, 4, 8) == [1, 2, 3, 4]
  assert kplan.eval_ks([6, 2], 4, 8) == [2, 6]  # the model runs any k up to num_experts
  for bad in ([], [2, 2], [0], [9]):
    with pytest.raises(ValueError, match="distinct and within"):
      kplan.eval_ks(bad, 4, 8)
  assert kplan.reference_k(4, [1, 2, 4]) == 4 and kplan.reference_k(4, [1, 2]) == 2


def test_training_plan_levels_slots_and_ks():
  plan = kplan.KPlan.for_training(4, (3, 2, 4), "soft")
  assert plan.levels == (2, 3, 4) and plan.heldout_ks == (1, 2, 3, 4) and plan.final_eval_ks == [1, 2, 3, 4]
  assert plan.slots(2) == router.num_slots(2, 4, "soft") == 4 and plan.max_slots == 4
  hard = kplan.KPlan.for_training(4, (1, 2), "hard", requested_eval_ks=(2,))
  assert hard.max_slots == 2 and hard.heldout_ks == (2,) and hard.final_eval_ks == [1, 2, 3, 4]
  with pytest.raises(ValueError, match=r"eval\.ks=\(5,\)"):
    kplan.KPlan.for_training(4, (2,), "soft", requested_eval_ks=(5,))
  with pytest.raises(ValueError, match="router mode"):
    kplan.KPlan.for_training(4, (2,), "fuzzy")
  plan.check_model(models.tiny("olmoe", k_pre=4))
  with pytest.raises(ValueError, match="k_pre=2"):
    plan.check_model(models.tiny("olmoe", k_pre=2))


def test_schedule_from_config_is_the_runs_schedule():
  """One builder: the seed and the levels come from the config; unresolved units read as 0.0 until resolved."""
  c = override(demo.get_config(), seed=7, **{"schedule.switch_at": 3, "schedule.switch_unit": "steps"})
  s = schedule.from_config(c)
  assert s.seed == 7 and s.k_train == tuple(c.schedule.k_train) and s.switch_at == 0.0
  assert s.levels == kplan.KPlan.for_training(4, s.levels, c.router_mode).levels
