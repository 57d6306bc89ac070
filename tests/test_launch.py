"""Launch scripts and `train --dry_run`: the plan (mesh, per-device memory, tokens, checkpoints) from configs
alone, the scripts' dry runs on CPU, and the TPU script's remote quoting and code bundle."""

import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from configs import demo, olmoe
from phds_jax.training import dry_run

REPO = Path(__file__).resolve().parent.parent
OLMOE_SHAPES = REPO / "launch" / "shapes" / "OLMoE-1B-7B-0125"  # config.json only: the sizes, no weights
DATA = REPO / "phds_jax" / "assets" / "demo_sft" / "train.jsonl"
REAL = [f"--config.init.path={OLMOE_SHAPES}", f"--config.data.path={DATA}"]


def _olmoe_params() -> int:
  """OLMoE-1B-7B's parameter count from its published sizes, independently of the model code."""
  d, ffn, experts, layers, vocab = 2048, 1024, 64, 16, 50304
  per_layer = 4 * d * d + 2 * d + experts * 3 * d * ffn + d * experts + 2 * d  # attn, qk-norm, experts, router, norms
  return layers * per_layer + 2 * vocab * d + d


def _olmoe(**mesh):
  c = olmoe.get_config()
  c.init.path = str(OLMOE_SHAPES)
  c.mesh.update(mesh)
  return c


def test_plan_counts_parameters_and_shards_them_like_the_trainer():
  p = dry_run.make_plan(_olmoe(data=1, fsdp=-1, expert=1), "runs/x", 8)
  assert p.total_params == _olmoe_params()  # 6.92 B
  assert p.mesh == {"data": 1, "fsdp": 8, "expert": 1}
  replicated = 16 * (2048 * 64 + 4 * 2048) + 2048  # routers and norms; every other tensor is split 8 ways
  assert p.param_bytes == 4 * ((_olmoe_params() - replicated) // 8 + replicated)
  assert p.adam_bytes == 2 * p.param_bytes and p.state_bytes == 4 * p.param_bytes
  experts = 16 * 64 * 3 * 2048 * 1024
  p = dry_run.make_plan(_olmoe(data=-1, fsdp=1, expert=8), "runs/x", 8)
  assert p.param_bytes == 4 * (_olmoe_params() - experts + experts // 8)  # only the experts are split
  assert p.active_params_k_pre == _olmoe_params() - 16 * (64 - 8) * 3 * 2048 * 1024  # 1.28 B
  assert p.tokens_per_step == 128 * 4096 and p.num_steps == 7000
  one = dry_run.make_plan(_olmoe(data=1, fsdp=-1, expert=1), "runs/x", 1, device_memory_gb=80)
  assert one.state_bytes / 2**30 > 100 and one.fits is False  # fp32 master + grads + Adam on one 80 GB GPU
  assert dry_run.make_plan(_olmoe(data=1, fsdp=-1, expert=1), "runs/x", 4, device_memory_gb=80).fits is True
  with pytest.raises(ValueError, match="does not divide num_experts"):
    dry_run.make_plan(_olmoe(data=1, fsdp=1, expert=-1), "runs/x", 6)


def test_plan_text_names_mesh_memory_tokens_steps_and_checkpoints():
  p = dry_run.make_plan(demo.get_config(), "runs/demo-1", 1, num_hosts=1, device_memory_gb=16)
  text = p.render()
  for needle in ("mesh data=1 x fsdp=1 x expert=1", "per device:  params", "AdamW moments", "fits",
                 "16 rows x 128 tokens = 2,048 tokens per step", "steps:       100",
                 "runs/demo-1/checkpoints/<step> (every 50 steps, the latest 2 kept plus the best by validation",
                 "anchored at k=2 from step 90"):
    assert needle in text, needle
  shared = dry_run.make_plan(_olmoe(), "/local/run", 16, num_hosts=2)
  assert any("every host" in w for w in shared.warnings)
  assert not dry_run.make_plan(_olmoe(), "gs://b/run", 16, num_hosts=2).warnings


def _sh(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(REPO / "launch" / script), *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "PYTHON": sys.executable, **env})


def test_single_gpu_refuses_olmoe_on_one_80gb_gpu_and_plans_fsdp_over_more():
  one = _sh("single_gpu.sh", "--dry_run", *REAL, NUM_GPUS="1")
  assert one.returncode == dry_run.EXIT_DOES_NOT_FIT, one.stderr
  assert "DOES NOT FIT" in one.stdout and "mesh data=1 x fsdp=1 x expert=1" in one.stdout
  four = _sh("single_gpu.sh", "--dry_run", *REAL, NUM_GPUS="4")
  assert four.returncode == 0, four.stderr
  assert "mesh data=1 x fsdp=4 x expert=1" in four.stdout and " fits" in four.stdout
  # Without --dry_run the same plan runs first and stops the launch before any weights load.
  refused = _sh("single_gpu.sh", *REAL, NUM_GPUS="1")
  assert refused.returncode == dry_run.EXIT_DOES_NOT_FIT and "not starting" in refused.stderr


def test_gpu_multinode_dry_run_plans_all_nodes_and_needs_slurm():
  out = _sh("gpu_multinode.sh", "--dry_run", *REAL, NODES="2", GPUS_PER_NODE="8", SLURM_JOB_ID="",
            SLURM_JOB_NUM_NODES="")
  assert out.returncode == 0, out.stderr
  assert "16 on 2 host(s)" in out.stdout and "mesh data=2 x fsdp=1 x expert=8" in out.stdout
  assert "every host sees" in out.stdout  # the default workdir is a path: it must be shared
  outside = _sh("gpu_multinode.sh", *REAL, SLURM_JOB_ID="")
  assert outside.returncode == 2 and "sbatch" in outside.stderr


def test_tpu_pod_syncs_code_quotes_arguments_and_plans(tmp_path):
  hostile = "--config.name=a b;$(touch pwned)'\"*"
  env = dict(TPU_NAME="my-tpu", ZONE="us-east5-a", WORKDIR="gs://bucket/run", ACCELERATOR_TYPE="v5p-16",
             KEEP_BUNDLE=str(tmp_path / "code.tar.gz"))
  out = _sh("tpu_pod.sh", "--dry_run", *REAL, hostile, **env)
  assert out.returncode == 0, out.stderr
  assert "8 chips on 2 host(s)" in out.stdout and "8 on 2 host(s)" in out.stdout
  commands = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]
  assert [c[4] for c in commands] == ["scp", "ssh", "ssh"]
  assert all("--worker=all" in c for c in commands)
  remote = next(a for a in commands[-1] if a.startswith("--command="))[len("--command="):]
  argv = shlex.split(remote.split("&&", 1)[1])  # what the worker's shell runs after `cd ~/phds_jax`
  assert argv[1:4] == ["-m", "phds_jax.train", "--distributed"] and argv[-1] == hostile
  assert "--workdir=gs://bucket/run" in argv
  assert not (REPO / "pwned").exists()
  with tarfile.open(tmp_path / "code.tar.gz") as tar:
    names = set(tar.getnames())
  assert {"setup.py", "phds_jax/train.py", "configs/olmoe.py"} <= names and not any(".git/" in n for n in names)
  local = _sh("tpu_pod.sh", "--dry_run", *REAL, **{**env, "WORKDIR": "runs/local"})
  assert local.returncode == 2 and "must be gs://" in local.stderr
