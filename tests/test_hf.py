"""HF checkpoint interop: load/save against real transformers models, Orbax params, the convert CLI."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.numpy  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from phds_jax import checkpoint, hf  # noqa: E402
from phds_jax.hf import config as hf_config  # noqa: E402
from phds_jax.models.config import ConfigError, tiny  # noqa: E402
from tests.hf_models import make_tiny_hf_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe")
# Exercise each family's optional features: OLMoE q/k/v/o bias + clip_qkv, Qwen3 attention_bias.
FAMILY_OVERRIDES = {"olmoe": dict(attention_bias=True, clip_qkv=8.0), "qwen2_moe": {},
                    "qwen3_moe": dict(attention_bias=True)}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
  root = tmp_path_factory.mktemp("hf")
  return {mt: make_tiny_hf_model(mt, root, **FAMILY_OVERRIDES[mt]) for mt in FAMILIES}


def torch_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def expected_params(model: torch.nn.Module) -> dict:
  """Our tree built from the torch modules' in-memory (fused) tensors, independently of hf's table."""
  sd, cfg = torch_state(model), model.config
  lin = lambda key: sd[key].T  # noqa: E731
  out = {"embed": {"embedding": sd["model.embed_tokens.weight"]}, "final_norm": {"scale": sd["model.norm.weight"]}}
  if not cfg.tie_word_embeddings:
    out["lm_head"] = {"kernel": lin("lm_head.weight")}
  glu = lambda p: {"wi": np.concatenate([lin(p + "gate_proj.weight"), lin(p + "up_proj.weight")], 1),  # noqa
                   "wo": lin(p + "down_proj.weight")}
  for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}."
    attn = {}
    for n in "qkvo":
      attn[f"{n}_proj"] = {"kernel": lin(f"{p}self_attn.{n}_proj.weight")}
      if f"{p}self_attn.{n}_proj.bias" in sd:
        attn[f"{n}_proj"]["bias"] = sd[f"{p}self_attn.{n}_proj.bias"]
    for n in "qk":
      if f"{p}self_attn.{n}_norm.weight" in sd:
        attn[f"{n}_norm"] = {"scale": sd[f"{p}self_attn.{n}_norm.weight"]}
    layer = {"input_norm": {"scale": sd[p + "input_layernorm.weight"]}, "attn": attn,
             "post_attn_norm": {"scale": sd[p + "post_attention_layernorm.weight"]}}
    if p + "mlp.experts.gate_up_proj" in sd:
      moe = {"router": {"kernel": lin(p + "mlp.gate.weight")},
             "wi": sd[p + "mlp.experts.gate_up_proj"].transpose(0, 2, 1),
             "wo": sd[p + "mlp.experts.down_proj"].transpose(0, 2, 1)}
      if p + "mlp.shared_expert_gate.weight" in sd:
        moe["shared"] = glu(p + "mlp.shared_expert.")
        moe["shared_gate"] = {"kernel": lin(p + "mlp.shared_expert_gate.weight")}
      layer["moe"] = moe
    else:
      layer["mlp"] = glu(p + "mlp.")
    out[f"layer_{i}"] = layer
  return out


def assert_params_match(params, model: torch.nn.Module, dtype=np.float32) -> None:
  expected = jax.tree.map(lambda x: np.asarray(x).astype(dtype), expected_params(model))
  chex.assert_trees_all_equal_structs(params, expected)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, expected)
  assert all(x.dtype == dtype for x in jax.tree.leaves(params))


def assert_roundtrip(out: Path, model: torch.nn.Module) -> transformers.PreTrainedModel:
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
  got, want = torch_state(reloaded), torch_state(model)
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  return reloaded


def edit_weights(src: Path, dst: Path, fn) -> Path:
  """Copies a single-file checkpoint, applying `fn` to its {name: array} dict."""
  shutil.copytree(src, dst)
  tensors = safetensors.numpy.load_file(dst / "model.safetensors")
  safetensors.numpy.save_file(fn(tensors), dst / "model.safetensors", metadata={"format": "pt"})
  return dst


# ------------------------------------------------------------------------------------ load / save / layouts


@pytest.mark.parametrize("model_type", FAMILIES)
def test_load_matches_torch_and_save_roundtrips(models, model_type, tmp_path):
  model, src = models[model_type]
  cfg, params = hf.load(src)
  assert cfg.k_pre == 4 and cfg.num_experts == 8 and cfg.param_dtype == "float32"
  assert_params_match(params, model)
  out = hf.save(tmp_path / "out", cfg, params)
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
  reloaded = assert_roundtrip(out, model)
  for key in ("model_type", "num_experts_per_tok", "norm_topk_prob", "rms_norm_eps", "head_dim",
              "num_key_value_heads", "eos_token_id", "router_aux_loss_coef", "clip_qkv"):
    assert getattr(reloaded.config, key, None) == getattr(model.config, key, None), key
  assert reloaded.config.num_experts == 8
  assert hf.load(out)[0] == cfg


def test_sharded_both_ways(tmp_path):
  model, src = make_tiny_hf_model("qwen2_moe", tmp_path, max_shard_size="20KB")
  assert (src / "model.safetensors.index.json").exists()
  cfg, params = hf.load(src)
  assert_params_match(params, model)
  out = hf.save(tmp_path / "out", cfg, params, max_shard_bytes=20_000)
  shards = sorted(out.glob("model-*.safetensors"))
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(shards) > 3 and not (out / "model.safetensors").exists()
  assert set(index["weight_map"].values()) == {s.name for s in shards}
  assert all(s.stat().st_size < 20_000 + 4096 for s in shards)
  assert_roundtrip(out, model)
  chex.assert_trees_all_equal(hf.load(out)[1], params)


@pytest.mark.parametrize("model_type", ["olmoe", "qwen3_moe"])
def test_fused_expert_layout(models, model_type, tmp_path):
  """transformers' in-memory layout (gate_up_proj/down_proj stacks), here in layer 0 only: detection is per layer."""
  model, src = models[model_type]
  sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  p = "model.layers.1.mlp.experts."
  gate_up, down = sd.pop(p + "gate_up_proj"), sd.pop(p + "down_proj")
  for e in range(gate_up.shape[0]):
    gate, up = gate_up[e].chunk(2, dim=0)
    sd.update({f"{p}{e}.gate_proj.weight": gate.contiguous(), f"{p}{e}.up_proj.weight": up.contiguous(),
               f"{p}{e}.down_proj.weight": down[e].contiguous()})
  (tmp_path / "fused").mkdir()
  shutil.copy(src / "config.json", tmp_path / "fused")
  safetensors.torch.save_file(sd, tmp_path / "fused" / "model.safetensors", metadata={"format": "pt"})
  _, params = hf.load(tmp_path / "fused")
  assert_params_match(params, model)


@pytest.mark.parametrize("model_type,overrides,moe_layers", [
    ("qwen2_moe", dict(mlp_only_layers=[1]), (True, False)),
    ("qwen3_moe", dict(decoder_sparse_step=2), (False, True)),
])
def test_dense_layers(model_type, overrides, moe_layers, tmp_path):
  model, src = make_tiny_hf_model(model_type, tmp_path, **overrides)
  cfg, params = hf.load(src)
  assert cfg.moe_layers == moe_layers and cfg.dense_ffn == 48
  assert_params_match(params, model)
  out = hf.save(tmp_path / "out", cfg, params)
  written = json.loads((out / "config.json").read_text())
  assert {k: written[k] for k in overrides} == overrides
  assert_roundtrip(out, model)


def test_tied_embeddings(tmp_path):
  model, src = make_tiny_hf_model("qwen3_moe", tmp_path, tie_word_embeddings=True)
  cfg, params = hf.load(src, strict=True)
  assert cfg.tie_embeddings and "lm_head" not in params
  assert_params_match(params, model)
  out = hf.save(tmp_path / "out", cfg, params)
  assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
  assert_roundtrip(out, model)


def test_save_k_and_bfloat16(models, tmp_path):
  model, src = models["qwen2_moe"]
  cfg, params = hf.load(src, dtype="bfloat16")
  assert cfg.param_dtype == "bfloat16"
  assert_params_match(params, model, dtype=jnp.bfloat16)
  out = hf.save(tmp_path / "out", cfg, params, k=2)
  written = json.loads((out / "config.json").read_text())
  assert written["num_experts_per_tok"] == 2 and written["dtype"] == "bfloat16"
  with safetensors.safe_open(out / "model.safetensors", "numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
  assert reloaded.config.num_experts_per_tok == 2 and reloaded.dtype == torch.bfloat16
  want = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
  for key, value in reloaded.state_dict().items():
    torch.testing.assert_close(value, want[key], rtol=0, atol=0)
  # Cast on save: float32 params written as float16.
  cfg32, params32 = hf.load(src)
  out16 = hf.save(tmp_path / "out16", cfg32, params32, dtype="float16")
  assert hf.load(out16, dtype="float16")[1]["embed"]["embedding"].dtype == jnp.float16
  with pytest.raises(ConfigError, match="k=9"):
    hf.save(tmp_path / "bad_k", cfg, params, k=9)


def test_save_refuses_overwrite(models, tmp_path):
  _, src = models["olmoe"]
  cfg, params = hf.load(src)
  out = hf.save(tmp_path / "out", cfg, params)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    hf.save(out, cfg, params)
  hf.save(out, cfg, params, k=1, overwrite=True)
  assert json.loads((out / "config.json").read_text())["num_experts_per_tok"] == 1
  assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or backup dirs left behind
  with pytest.raises(hf.CheckpointError, match="lack leaf layer_1/moe/router/kernel"):
    hf.save(tmp_path / "broken", cfg, {**params, "layer_1": {**params["layer_1"], "moe": {}}})
  assert not (tmp_path / "broken").exists()


# ------------------------------------------------------------------------------------------------ errors


def test_error_unknown_or_missing_model_type(models, tmp_path):
  _, src = models["olmoe"]
  for name, value in (("mixtral", "mixtral"), ("none", None)):
    dst = shutil.copytree(src, tmp_path / name)
    d = json.loads((dst / "config.json").read_text())
    d["model_type"] = value
    (dst / "config.json").write_text(json.dumps({k: v for k, v in d.items() if v is not None}))
    with pytest.raises(ConfigError, match="mixtral" if value else "no 'model_type'") as err:
      hf.load(dst)
    assert str(dst / "config.json") in str(err.value)


def test_error_missing_misshaped_and_int_tensors(models, tmp_path):
  _, src = models["qwen2_moe"]
  key = "model.layers.1.mlp.experts.3.up_proj.weight"
  dst = edit_weights(src, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != key})
  with pytest.raises(hf.CheckpointError, match=f"missing tensor '{key}'"):
    hf.load(dst)
  dst = edit_weights(src, tmp_path / "shape", lambda t: {**t, key: t[key][:-1]})
  with pytest.raises(hf.CheckpointError, match=r"expected shape \(16, 32\), got \(15, 32\)") as err:
    hf.load(dst)
  assert key in str(err.value) and "model.safetensors" in str(err.value)
  dst = edit_weights(src, tmp_path / "int", lambda t: {**t, key: t[key].astype(np.int32)})
  with pytest.raises(hf.CheckpointError, match="I32 is not floating point") as err:
    hf.load(dst)
  assert key in str(err.value)


def test_unused_tensor_warns_or_raises(models, tmp_path, caplog):
  _, src = models["qwen3_moe"]
  dst = edit_weights(src, tmp_path / "extra", lambda t: {**t, "model.layers.0.mlp.bogus": np.zeros(3, np.float32)})
  with caplog.at_level(logging.WARNING, logger="phds_jax.hf"):
    hf.load(dst)
  assert "model.layers.0.mlp.bogus" in caplog.text
  with pytest.raises(hf.CheckpointError, match="not used by qwen3_moe: model.layers.0.mlp.bogus"):
    hf.load(dst, strict=True)


def test_error_pytorch_bin_only_and_no_tokenizer(models, tmp_path):
  _, src = models["olmoe"]
  (tmp_path / "bin").mkdir()
  shutil.copy(src / "config.json", tmp_path / "bin")
  (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(hf.CheckpointError, match="only safetensors"):
    hf.load(tmp_path / "bin")
  with pytest.raises(hf.CheckpointError, match="tokenizer.json"):
    hf.load_tokenizer(src)


@pytest.mark.parametrize("change,match", [
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "only default RoPE"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(hidden_act="gelu"), "silu only"),
])
def test_unsupported_config(models, change, match, tmp_path):
  _, src = models["qwen2_moe"]
  d = {**json.loads((src / "config.json").read_text()), **change}
  with pytest.raises(ConfigError, match=match):
    hf.config_from_hf(d)
  dst = shutil.copytree(src, tmp_path / "c")
  (dst / "config.json").write_text(json.dumps(d))
  with pytest.raises(ConfigError, match=match):
    hf.load(dst)


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("model_type", FAMILIES)
def test_config_roundtrip(models, model_type):
  cfg = tiny(model_type, param_dtype="bfloat16", tie_embeddings=True, rope_theta=5e5)
  d = hf.config_to_hf(cfg)
  assert d["architectures"] == [hf_config._ARCHITECTURES[model_type]] and d["dtype"] == "bfloat16"
  assert hf.config_from_hf(d, param_dtype="bfloat16") == cfg
  transformers.AutoConfig.for_model(**d)  # transformers accepts what we write
  source = json.loads((models[model_type][1] / "config.json").read_text())
  again = hf.config_to_hf(hf.config_from_hf(source))
  dropped = {"transformers_version", "layer_types", "num_local_experts"}
  assert {k: v for k, v in source.items() if k not in dropped}.items() <= again.items()


def test_config_legacy_fields():
  """Pre-v5 configs: top-level rope_theta, torch_dtype, null rope_scaling; Qwen3 num_local_experts."""
  d = hf.config_to_hf(tiny("qwen3_moe", num_experts=16))
  d.pop("rope_parameters")
  d.update(rope_theta=1e6, torch_dtype="bfloat16", rope_scaling=None, num_local_experts=d.pop("num_experts"))
  cfg = hf.config_from_hf(d, gmm_impl="dense")
  assert (cfg.rope_theta, cfg.num_experts, cfg.param_dtype, cfg.gmm_impl) == (1e6, 16, "float32", "dense")
  assert "torch_dtype" not in cfg.hf_extra_json


def test_config_not_expressible():
  with pytest.raises(ConfigError, match="only qwen2_moe"):
    hf.config_to_hf(tiny("olmoe", shared_ffn=8))
  with pytest.raises(ConfigError, match="qk_norm"):
    hf.config_to_hf(tiny("qwen3_moe", qk_norm="full"))
  with pytest.raises(ConfigError, match="dense layers"):
    hf.config_to_hf(tiny("olmoe", moe_layers=(True, False), dense_ffn=8))


# --------------------------------------------------------------------------------------- orbax and the CLI


def test_orbax_params_roundtrip(models, tmp_path):
  _, src = models["qwen2_moe"]
  cfg, params = hf.load(src)
  checkpoint.save_params(tmp_path / "ckpt", cfg, params)
  cfg2, params2 = checkpoint.load_params(tmp_path / "ckpt")
  assert cfg2 == cfg
  chex.assert_trees_all_equal(params2, params)
  cfg3, params3 = checkpoint.load_params(tmp_path / "ckpt", dtype="bfloat16")
  assert cfg3 == cfg.replace(param_dtype="bfloat16")
  chex.assert_trees_all_equal(params3, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))


def _tokenizer_files(dst: Path) -> None:
  import tokenizers
  vocab = {f"t{i}": i for i in range(64)} | {"[UNK]": 64}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(dst / "tokenizer.json"))
  (dst / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))


def test_convert_cli_both_directions(models, tmp_path):
  model, src = models["olmoe"]
  src = shutil.copytree(src, tmp_path / "src")
  _tokenizer_files(src)
  assert hf.load_tokenizer(src).encode("t3 t5").ids == [3, 5]
  run = lambda *args: subprocess.run(  # noqa: E731
      [sys.executable, "-m", "phds_jax.convert", *args, "--noprogress"], cwd=REPO, capture_output=True, text=True,
      check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  out = run(f"--hf_dir={src}", f"--out={tmp_path / 'orbax'}")
  assert "params" in out and "MiB" in out
  out = run(f"--orbax_dir={tmp_path / 'orbax'}", f"--out_hf={tmp_path / 'hf'}", "--k=2", "--dtype=bfloat16",
            f"--tokenizer_dir={src}")
  assert f"-> {tmp_path / 'hf'}" in out
  written = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert written["num_experts_per_tok"] == 2 and written["dtype"] == "bfloat16"
  assert (tmp_path / "hf" / "tokenizer.json").exists() and (tmp_path / "hf" / "tokenizer_config.json").exists()
  cfg, params = hf.load(tmp_path / "hf")
  assert cfg.k_pre == 2
  assert_params_match(params, copy.deepcopy(model).to(torch.bfloat16).float())
