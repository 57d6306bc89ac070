"""Evaluation: scoring conventions, metrics math, task formats, parity of log-likelihoods / generation with
transformers, rolling perplexity, data errors and the CLI end to end (tiny models, CPU)."""

import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, processors, trainers

from phds_jax import hf
from phds_jax.evaluation import (EvalDataError, MCItem, TextEncoder, evaluate, get_task, items, metrics as M,
                                 perplexity, records, report)
from phds_jax.evaluation.engine import Engine, bucket_length
from tests.hf_models import make_tiny_hf_model

DATA = Path(__file__).parent / "testdata" / "eval"
KS = (2, 4)
BATCH = 4
SHAPE = dict(batch_size=BATCH, min_bucket=32)  # every model call is [4, 32] (or a [4, 38] cache): few compiles


# ------------------------------------------------------------------------------------------------ fixtures


def _corpus() -> list[str]:
  texts = [line for f in sorted(DATA.glob("*.jsonl")) for line in f.read_text(encoding="utf-8").splitlines()]
  return texts + [(DATA / "wikitext.txt").read_text(encoding="utf-8")]


def _byte_level_bpe(vocab_size: int = 500) -> Tokenizer:
  """GPT-NeoX / Qwen-style byte-level BPE (no BOS added), trained on the fixtures so sequences stay short."""
  tok = Tokenizer(tok_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=["<|endoftext|>"], show_progress=False)
  tok.train_from_iterator(_corpus(), trainer)
  return tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(HF dir with tokenizer.json, cfg, params, tokenizer, {k: torch model at k})."""
  tok = _byte_level_bpe()
  _, path = make_tiny_hf_model("olmoe", tmp_path_factory.mktemp("ckpt"), vocab_size=512)
  tok.save(str(path / "tokenizer.json"))
  cfg, params = hf.load(path)
  torch_models = {k: transformers.AutoModelForCausalLM.from_pretrained(
      path, num_experts_per_tok=k, attn_implementation="eager", dtype=torch.float32).eval() for k in KS}
  return path, cfg, params, tok, torch_models


def _torch_logprobs(model, ids: list[int]) -> np.ndarray:
  """log p(ids[i] | ids[:i]) for i >= 1, with one plain full forward."""
  with torch.no_grad():
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
  return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


# ------------------------------------------------------------------------------------------ scoring rules


def test_mc_predictions_acc_norm_bytes_and_ties():
  # acc picks the higher raw LL; acc_norm divides by characters, so the long choice wins there.
  assert M.mc_predictions([-3.0, -5.0], ["ab", "abcdefghij"]) == {"acc": 0, "acc_norm": 1, "acc_bytes": 1}
  assert M.mc_predictions([-2.0, -2.0, -3.0], ["x", "y", "z"])["acc"] == 0  # tie -> lowest index
  assert M.mc_predictions([-3.0, -2.0, -2.0], ["x", "y", "z"])["acc"] == 1
  # "éé": 2 chars but 4 bytes. chars: -2.2/2 = -1.1 < -3/3 = -1 -> 1; bytes: -2.2/4 = -0.55 > -1 -> 0.
  assert M.mc_predictions([-2.2, -3.0], ["éé", "abc"]) == {"acc": 0, "acc_norm": 1, "acc_bytes": 0}


def test_encode_pair_whitespace_bos_and_non_prefix_fallback():
  enc = TextEncoder(_byte_level_bpe(), hf_extra_json=json.dumps({"bos_token_id": 7, "eos_token_id": 3}))
  assert enc.special_prefix == [] and enc.prefix_token_id == 7 and enc.eos_token_id == 3
  assert enc.encode_pair("Answer: ", "yes") == enc.encode_pair("Answer:", " yes")
  ctx, cont = enc.encode_pair("Question: which animal barks?\nAnswer:", " dog")
  assert ctx + cont == enc.encode("Question: which animal barks?\nAnswer: dog")
  assert enc.encode_pair("", "dog") == ([7], enc.encode("dog"))
  # A BPE that merges across the boundary: "a" + "b" -> "ab" is not prefixed by encode("a").
  merging = Tokenizer(tok_models.BPE({"a": 0, "b": 1, "ab": 2, "<s>": 3, "</s>": 4}, [("a", "b")]))
  merging.add_special_tokens(["<s>", "</s>"])
  merging.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 3),
                                                                                              ("</s>", 4)])
  enc = TextEncoder(merging)
  assert enc.special_prefix == [3] and enc.prefix_token_id == 3  # BOS from the post-processor, EOS not added
  assert enc.encode("ab") == [3, 2]
  assert enc.encode_pair("a", "b") == ([3, 0], [1])  # separate encodings, continuation spelled exactly
  assert enc.encode_pair("", "ab") == ([3], [2])
  assert enc.rolling_windows(list(range(10)), 4) == [([3], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([7], [8, 9])]


def test_bucket_length():
  assert [bucket_length(n, 100) for n in (1, 16, 17, 33, 64, 65, 100)] == [16, 16, 32, 64, 64, 100, 100]
  with pytest.raises(ValueError):
    bucket_length(101, 100)


# ---------------------------------------------------------------------------------------------- metrics


def test_bootstrap_ci_matches_numpy():
  values = np.random.default_rng(1).random(57) < 0.6
  lo, hi = M.bootstrap_ci(values, n_boot=1000, seed=3)
  idx = np.random.default_rng(3).integers(0, 57, (1000, 57))
  ref = np.percentile(values[idx].mean(1), [2.5, 97.5])
  np.testing.assert_allclose([lo, hi], ref, rtol=0, atol=1e-12)
  assert lo <= values.mean() <= hi
  assert M.bootstrap_ci([1.0] * 10) == (1.0, 1.0)


def test_paired_bootstrap_and_ratio_ci():
  rng = np.random.default_rng(0)
  a, b = rng.random(40), rng.random(40)
  out = M.paired_bootstrap(a, b, n_boot=500, seed=5)
  idx = np.random.default_rng(5).integers(0, 40, (500, 40))
  diffs = a[idx].mean(1) - b[idx].mean(1)
  np.testing.assert_allclose([out["lo"], out["hi"]], np.percentile(diffs, [2.5, 97.5]), atol=1e-12)
  assert out["diff"] == pytest.approx(a.mean() - b.mean()) and out["n"] == 40
  same = M.paired_bootstrap(a, a)
  assert (same["diff"], same["lo"], same["hi"], same["p_value"]) == (0.0, 0.0, 0.0, 1.0)
  shifted = M.paired_bootstrap(a + 1.0, a)
  assert shifted["lo"] == pytest.approx(1.0) and shifted["p_value"] == 0.0
  with pytest.raises(ValueError):
    M.paired_bootstrap(a, b[:-1])
  ll, tok = np.array([-10.0, -30.0]), np.array([5, 10])
  lo, hi = M.bootstrap_ratio_ci(ll, tok, lambda r: np.exp(-r), n_boot=200)
  assert math.exp(2.0) <= lo <= math.exp(40 / 15) <= hi <= math.exp(3.0)


def test_agreement_drop_and_perplexity_math():
  assert M.agreement([0, 1, 2, 1], [0, 1, 1, 1]) == 0.75
  ks, m = M.agreement_matrix({4: [0, 1, 2, 1], 2: [0, 1, 1, 1], 3: [1, 1, 1, 1]})
  assert ks == [2, 3, 4]
  np.testing.assert_allclose(m, [[1, 0.75, 0.75], [0.75, 1, 0.5], [0.75, 0.5, 1]])
  a, b = M.align({"q1": 0, "q2": 1, "q3": 2}, {"q3": 2, "q2": 0, "q9": 1})
  assert (a, b) == ([1, 2], [0, 2])
  cmp = M.compare_agreements(0.8, 0.5)
  assert cmp["absolute"] == pytest.approx(0.3) and cmp["relative"] == pytest.approx(0.6)
  assert M.relative_drop({2: 0.6, 3: 0.7, 4: 0.8}, 4) == pytest.approx({2: 0.25, 3: 0.125, 4: 0.0})
  assert M.relative_increase({2: 12.0, 4: 10.0}, 4) == pytest.approx({2: 0.2, 4: 0.0})
  p = M.perplexities([-10.0, -20.0], [10, 20], [5, 10], [40, 80])
  assert p["token_perplexity"] == pytest.approx(math.e)
  assert p["word_perplexity"] == pytest.approx(math.exp(2))
  assert p["byte_perplexity"] == pytest.approx(math.exp(0.25))
  assert p["bits_per_byte"] == pytest.approx(0.25 / math.log(2))
  assert M.normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
  assert M.exact_match("paris.", ["Paris, France", "Paris"]) and not M.exact_match("Lyon", ["Paris"])


# ------------------------------------------------------------------------------------------ task formats


def _items(spec: str) -> list:
  return [item for _, item in get_task(spec).load()]


def test_task_formats_hf_schema():
  arc = _items(f"arc_easy:{DATA / 'arc_easy.jsonl'}")
  assert arc[0] == MCItem(("Question: Which gas do plants absorb?\nAnswer:",) * 4,
                          (" oxygen", " carbon dioxide", " helium", " neon"),
                          ("oxygen", "carbon dioxide", "helium", "neon"), 1)
  assert arc[1].gold == 1  # numeric labels "1".."3", answerKey "2"
  boolq, = _items(f"boolq:{DATA / 'boolq.jsonl'}")
  assert boolq.contexts[0] == "The sky appears blue.\nQuestion: is the sky blue?\nAnswer:"
  assert (boolq.continuations, boolq.gold) == ((" no", " yes"), 1)
  hs = _items(f"hellaswag:{DATA / 'hellaswag.jsonl'}")
  assert hs[0].contexts[0] == ("Removing ice from car: Then, the man writes over the snow covering the window of a "
                               "car, and a woman wearing winter clothes smiles. Then")
  assert hs[0].continuations[3] == " , the man continues removing the snow on his car." and hs[0].gold == 3
  assert hs[1].contexts[0] == "Baking cookies: How to bake cookies. Preheat the oven. Set it to 350 degrees."
  assert hs[1].choices[0] == "Mix the dough well."
  piqa, = _items(f"piqa:{DATA / 'piqa.jsonl'}")
  assert piqa.contexts[0] == "Question: How do I open a jar?\nAnswer:" and piqa.choices == ("Twist the lid.",
                                                                                             "Hit it with a car.")
  sciq = _items(f"sciq:{DATA / 'sciq.jsonl'}")
  assert sciq[0].contexts[0] == "Plants make sugar by photosynthesis.\nQuestion: What do plants make?\nAnswer:"
  assert sciq[0].choices == ("rocks", "water", "salt", "sugar") and sciq[0].gold == 3
  assert sciq[1].contexts[0] == "\nQuestion: Boiling point of water?\nAnswer:"
  wino, = _items(f"winogrande:{DATA / 'winogrande.jsonl'}")
  assert wino.contexts == ("The trophy doesn't fit into the suitcase because the trophy",
                           "The trophy doesn't fit into the suitcase because the suitcase")
  assert wino.continuations == (" is too large.",) * 2 and wino.gold == 0
  siqa, = _items(f"siqa:{DATA / 'siqa.jsonl'}")
  assert siqa.contexts[0] == ("Q: Tracy didn't go home that evening and resisted Riley's attacks. "
                              "What does Tracy need to do before this?\nA:") and siqa.gold == 2
  obqa, = _items(f"openbookqa:{DATA / 'openbookqa.jsonl'}")
  assert obqa.contexts[0] == "The sun is responsible for" and obqa.gold == 3
  tqa = _items(f"triviaqa:{DATA / 'triviaqa.jsonl'}")
  assert tqa[0].prompt == "Question: Which city is the capital of France?\nAnswer:"
  assert tqa[0].answers == ("Paris", "Paris, France")
  mc = _items(f"jsonl:{DATA / 'mc.jsonl'}")
  assert len(mc) == 5 and mc[2].choices == ("five euros", "€5", "ten") and mc[2].gold == 1
  assert len(_items(f"jsonl:{DATA / 'mc.jsonl'}")[:2]) == 2 and len(get_task(f"jsonl:{DATA / 'mc.jsonl'}").load(
      limit=2)) == 2


def test_task_formats_tfds_schema():
  """tfds records arrive as numpy / bytes with ClassLabels as ints; `to_python` + the same converters."""
  arc = records.to_python({"question": b"Q?", "answerKey": np.int64(2),
                           "choices": {"text": np.array([b"a", b"b", b"c"], object), "label": np.array([0, 1, 2])}})
  assert items.arc(arc, "t[0]").gold == 2 and items.arc(arc, "t[0]").choices == ("a", "b", "c")
  assert items.boolq({"question": "q", "passage": "p", "answer": True, "title": "t"}, "t").gold == 1
  assert items.boolq({"question": "q", "passage": "p", "label": 0, "idx": 3}, "t").gold == 0
  wino = items.winogrande({"sentence": "A _ b.", "option1": "x", "option2": "y", "label": 1}, "t")
  assert wino.gold == 1 and wino.contexts == ("A x", "A y") and wino.continuations == (" b.", " b.")
  obqa = items.openbookqa({"question": {"stem": "S", "choice_A": "a", "choice_B": "b", "choice_C": "c",
                                          "choice_D": "d"}, "answerKey": 2}, "t")
  assert obqa.contexts[0] == "S" and obqa.gold == 2 and obqa.choices == ("a", "b", "c", "d")
  hs_hf = _items(f"hellaswag:{DATA / 'hellaswag.jsonl'}")[0]
  doc = json.loads((DATA / "hellaswag.jsonl").read_text().splitlines()[0])
  tfds_doc = {"context": doc["ctx_a"] + " " + doc["ctx_b"], "endings": doc["endings"],
              "activity_label": doc["activity_label"], "label": 3, "split_type": "indomain"}
  assert items.hellaswag(tfds_doc, "t") == hs_hf


def _tiny_arc_builder():
  """A local tfds builder with ai2_arc's features (ClassLabels, a sequence of dicts); prepared offline."""
  import tensorflow_datasets as tfds

  class PhdsTinyArc(tfds.core.GeneratorBasedBuilder):
    __module__ = "phds_tiny_arc"  # see tests/test_data.py: keeps tfds from needing importlib_resources
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      labels = tfds.features.ClassLabel(names=list("ABCDE"))
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "id": tfds.features.Text(), "question": tfds.features.Text(), "answerKey": labels,
          "choices": tfds.features.Sequence({"text": tfds.features.Text(), "label": labels})}))

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        yield i, {"id": f"q{i}", "question": f"Which is {i}?", "answerKey": "ABC"[i],
                  "choices": {"text": ["zero", "one", "two"], "label": ["A", "B", "C"]}}

  return PhdsTinyArc


def test_tfds_task_source(tmp_path):
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  _tiny_arc_builder()(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  task = get_task("arc_easy:tfds:phds_tiny_arc/test")
  assert task.source == "tfds:phds_tiny_arc/test"
  docs = task.load(data_dir=str(tmp_path), limit=2)
  assert [w for w, _ in docs] == ["tfds:phds_tiny_arc/test[0]", "tfds:phds_tiny_arc/test[1]"]
  for _, item in docs:  # tfds stores examples in its own (hashed) order
    g = item.gold
    assert item == MCItem((f"Question: Which is {g}?\nAnswer:",) * 3, (" zero", " one", " two"),
                          ("zero", "one", "two"), g)
  with pytest.raises(EvalDataError, match="tfds:nope/test: cannot open"):
    get_task("arc_easy:tfds:nope/test").load(data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="DATASET"):
    get_task("arc_easy:tfds:nosplit")


def test_wikitext_documents_and_detokenizer():
  docs = get_task(f"wikitext:{DATA / 'wikitext.txt'}").load()
  assert len(docs) == 2  # two top-level articles; "= = Career = =" stays inside the first
  first = docs[0][1]
  assert "film, television and theatre actor. He had a guest-starring role" in first.text
  assert "== Career ==" in first.text and "(Herons)" in first.text
  page = " = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor . He had a " \
         "guest @-@ starring role in 2000 .\n \n = = Career = = \n \n In 2006 , Boulter starred in a play ( Herons ) " \
         ".\n \n"
  assert first.words == len(page.split()) + 2  # re.split(r"\s+") counts the empty ends, as the harness does
  assert first.nbytes == len(page.encode())
  lines = [{"text": line} for line in (DATA / "wikitext.txt").read_text().splitlines(keepends=True)]
  by_lines = perplexity.wikitext_docs([(f"f:{i}", d) for i, d in enumerate(lines)], source="f")
  assert [d for _, d in by_lines] == [d for _, d in docs]
  assert perplexity.wikitext_docs([("p:1", {"page": page})])[0][1] == first


# ------------------------------------------------------------------------------------------- data errors


def test_data_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown task 'arc_eazy'.*arc_easy"):
    get_task("arc_eazy")
  with pytest.raises(ValueError, match="jsonl:PATH"):
    get_task("jsonl")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"context": "c", "choices": ["a", "b"], "gold": 0}\n{"context": "c", "choices": ["a", "b"]}\n')
  with pytest.raises(EvalDataError, match=r"bad.jsonl:2: jsonl:bad: missing field 'gold'"):
    get_task(f"jsonl:{bad}").load()
  bad.write_text('{"context": "c", "choices": ["a", "b"], "gold": 5}\n')
  with pytest.raises(EvalDataError, match=r"bad.jsonl:1: .*gold must be an int index into 2 choices"):
    get_task(f"jsonl:{bad}").load()
  bad.write_text('{"context": "c", "choices": ["a", "b"], "gold": 0}\n{oops\n')
  with pytest.raises(EvalDataError, match=r"bad.jsonl:2: invalid JSON"):
    get_task(f"jsonl:{bad}").load()
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(EvalDataError, match=r"empty.jsonl: no records"):
    get_task(f"arc_easy:{empty}").load()
  wino = tmp_path / "w.jsonl"
  wino.write_text('{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}\n')
  with pytest.raises(EvalDataError, match=r"w.jsonl:1: winogrande: sentence has no '_'"):
    get_task(f"winogrande:{wino}").load()
  with pytest.raises(EvalDataError, match=r"nope.jsonl: no such file"):
    get_task(f"jsonl:{tmp_path / 'nope.jsonl'}").load()
  with pytest.raises(EvalDataError, match="sciq: no tfds dataset"):
    get_task("sciq").load()
  with pytest.raises(EvalDataError, match="unknown file type"):
    get_task(f"ppl:{tmp_path / 'x.csv'}").load()


# ------------------------------------------------------------------------------- parity with transformers


def test_mc_loglikelihoods_match_transformers(tiny):
  path, cfg, params, tok, torch_models = tiny
  fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
  results = evaluate(cfg, params, tok, [f"jsonl:{DATA / 'mc.jsonl'}"], KS, **SHAPE, progress=False,
                     n_boot=100)
  docs = [json.loads(line) for line in (DATA / "mc.jsonl").read_text().splitlines()]
  for k in KS:
    records = results.samples["jsonl:mc"][k]
    for doc, rec in zip(docs, records):
      ctx = fast.encode(doc["context"])
      expected = []
      for choice in doc["choices"]:
        whole = fast.encode(doc["context"] + " " + choice)
        assert whole[:len(ctx)] == ctx
        expected.append(_torch_logprobs(torch_models[k], whole)[len(ctx) - 1:].sum())
      np.testing.assert_allclose(rec["lls"], expected, rtol=1e-5, atol=2e-4, err_msg=f"k={k} {doc}")
      assert rec["preds"] == M.mc_predictions(expected, doc["choices"])
    assert results.metric("jsonl:mc", k, "acc") == np.mean([r["correct"]["acc"] for r in records])
  assert results.samples["jsonl:mc"][2][0]["lls"] != results.samples["jsonl:mc"][4][0]["lls"]
  # Left truncation: a context longer than max_length keeps its last max_length + 1 - len(cont) tokens.
  enc = TextEncoder(tok)
  ctx, cont = enc.encode_pair(" ".join(d["context"] for d in docs), " lazy dog")
  assert len(ctx) + len(cont) > 33
  ll, _ = Engine(cfg, params, **SHAPE, max_length=32).loglikelihood([(ctx, cont)], k=2)
  whole = (ctx + cont)[-33:]
  np.testing.assert_allclose(ll[0], _torch_logprobs(torch_models[2], whole)[-len(cont):].sum(), atol=2e-4)


def test_rolling_perplexity_matches_direct_computation(tiny, tmp_path):
  path, cfg, params, tok, torch_models = tiny
  text = ("Robert Boulter is an English film, television and theatre actor. Café ☕ in 2006. He had a guest "
          "starring role in the television series The Bill.")
  (tmp_path / "doc.txt").write_text(text)
  ids = tok.encode(text, add_special_tokens=False).ids
  prefix = 0  # the tiny config's bos_token_id (the tokenizer adds none)
  assert 64 < len(ids) <= 4 * 32  # three windows
  for max_length in (32,):  # the windows fit one batch, so one compiled shape
    res = evaluate(cfg, params, tok, [f"ppl:{tmp_path / 'doc.txt'}"], [2], **SHAPE,
                   max_length=max_length, progress=False, n_boot=50)
    rec, = res.samples["ppl:doc"][2]
    expected = 0.0
    for start in range(0, len(ids), max_length):  # disjoint windows, each conditioned on the token before it
      window = ([prefix] + ids)[start:start + max_length + 1]
      expected += _torch_logprobs(torch_models[2], window).sum()
    assert rec["ll"] == pytest.approx(expected, abs=5e-4)
    assert (rec["tokens"], rec["words"], rec["bytes"]) == (len(ids), 26, len(text.encode()))
    entry = res.summary["tasks"]["ppl:doc"]["by_k"]["2"]
    assert entry["word_perplexity"] == pytest.approx(math.exp(-expected / 26), rel=1e-5)
    assert entry["bits_per_byte"] == pytest.approx(-expected / len(text.encode()) / math.log(2), rel=1e-5)


def test_greedy_generation_matches_full_forward_argmax(tiny, tmp_path):
  path, cfg, params, tok, torch_models = tiny
  enc = TextEncoder(tok)
  docs = [json.loads(line) for line in (DATA / "triviaqa.jsonl").read_text().splitlines()]
  prompts = [enc.encode(f"Question: {d['question']}?\nAnswer:") for d in docs]
  prompts.append(enc.encode("Question: Who wrote it?\nAnswer:"))  # 14 tokens vs 13: same 16-token bucket
  assert len({len(p) for p in prompts}) > 1  # left padding is exercised; 3 rows fill a batch of 4
  new = 6
  ours = Engine(cfg, params, **SHAPE).generate(prompts, 2, max_new_tokens=new)
  for prompt, got in zip(prompts, ours):
    ids = list(prompt)
    for _ in range(new):  # step-by-step argmax with the full forward
      with torch.no_grad():
        ids.append(int(torch_models[2](input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prompt):]
  res = evaluate(cfg, params, tok, [f"triviaqa:{DATA / 'triviaqa.jsonl'}"], [2], **SHAPE,
                 max_new_tokens=new, progress=False, n_boot=50)
  for got, rec in zip(ours, res.samples["triviaqa"][2]):
    cut = got[:got.index(1)] if 1 in got else got  # the tiny config's eos_token_id is 1
    assert rec["generation"] == enc.decode(cut).split("\n")[0].strip()
    assert rec["correct"]["exact_match"] == int(M.exact_match(rec["generation"], rec["answers"]))


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tiny, tmp_path):
  from absl import flags
  from phds_jax import eval as eval_cli
  path = tiny[0]
  out = tmp_path / "out"
  argv = ["eval", f"--checkpoint={path}", f"--tasks=jsonl:{DATA / 'mc.jsonl'},ppl:{DATA / 'wikitext.txt'}",
          "--ks=2,4", f"--batch_size={BATCH}", "--min_bucket=32", "--max_length=32", "--n_boot=100", f"--out={out}"]
  fv = eval_cli.define_flags(flags.FlagValues())  # not the global FLAGS: no clash with other entry points
  fv(argv)
  eval_cli.run(fv)
  summary = json.loads((out / "results.json").read_text())
  assert summary["meta"]["ks"] == [2, 4] and summary["meta"]["checkpoint"] == str(path.absolute())
  mc = summary["tasks"]["jsonl:mc"]
  assert mc["n"] == 5 and set(mc["by_k"]) == {"2", "4"}
  assert {"acc", "acc_ci", "acc_norm", "acc_bytes", "n"} <= set(mc["by_k"]["2"])
  assert mc["agreement"]["ks"] == [2, 4] and mc["relative_drop"]["4"] == 0.0
  assert summary["tasks"]["ppl:wikitext"]["by_k"]["4"]["word_perplexity"] > 1
  assert summary["average"]["tasks"] == ["jsonl:mc"]
  lines = (out / "samples" / "jsonl_mc_k2.jsonl").read_text().splitlines()
  assert len(lines) == 5 and len(json.loads(lines[0])["lls"]) == 3
  md = (out / "results.md").read_text()
  assert "| jsonl:mc | acc | 5 |" in md and "Agreement across k" in md
  for png in ("accuracy_vs_k.png", "agreement.png"):
    assert (out / png).read_bytes()[:4] == b"\x89PNG"
  between = report.agreement_between(out, 2, out, 4, "jsonl:mc", n_boot=100)
  assert between["agreement"] == pytest.approx(mc["agreement"]["matrix"][0][1]) and between["n"] == 5


def test_load_model_from_params_checkpoint(tiny, tmp_path):
  from phds_jax import checkpoint
  from phds_jax import eval as eval_cli
  path, cfg, params, _, _ = tiny
  checkpoint.save_params(tmp_path / "params", cfg, params)
  cfg2, params2, tok = eval_cli.load_model(str(tmp_path / "params"), tokenizer=str(path), dtype="bfloat16")
  assert cfg2.replace(dtype="float32", param_dtype="float32") == cfg and cfg2.dtype == "bfloat16"
  assert tok.get_vocab_size() == 500
  np.testing.assert_allclose(np.asarray(params2["lm_head"]["kernel"], np.float32),
                             np.asarray(params["lm_head"]["kernel"]), atol=1e-2)


# ---------------------------------------------------------------------------- demo checkpoint, user paths

DEMO = Path(hf.__file__).parent.parent / "assets" / "demo_base"


def test_prefix_token_defaults_to_the_tokenizers_end_of_text_and_can_be_set():
  """The demo checkpoints name no bos/eos id in config.json: perplexity must still run (on <|endoftext|>)."""
  tok = hf.load_tokenizer(DEMO)
  eot = tok.token_to_id("<|endoftext|>")
  enc = TextEncoder(tok)
  assert enc.prefix_token_id == eot and enc.eos_token_id == eot
  assert enc.rolling_windows([5, 6, 7], 2) == [([eot], [5, 6]), ([6], [7])]
  assert TextEncoder(tok, prefix_token_id=3).rolling_windows([5], 2) == [([3], [5])]
  with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
    TextEncoder(tok, prefix_token_id=10**6)
  bare = Tokenizer(tok_models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
  with pytest.raises(ValueError, match="--prefix_token_id"):
    TextEncoder(bare).rolling_windows([0], 4)


def test_all_tasks_checked_before_scoring_and_finished_tasks_kept(tmp_path, monkeypatch):
  from phds_jax.evaluation import runner
  cfg, params = hf.load(DEMO)
  tok = hf.load_tokenizer(DEMO)
  mc = str(Path(hf.__file__).parent.parent / "assets" / "demo_sft" / "mc_eval.jsonl")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"context": "x", "choices": ["a"]}\n')
  calls = []
  real_run = runner._run
  monkeypatch.setattr(runner, "_run", lambda prep, *a: calls.append(prep.task.name) or real_run(prep, *a))
  with pytest.raises(EvalDataError, match=r"bad.jsonl:1: jsonl:bad: missing field 'gold'"):
    evaluate(cfg, params, tok, [f"jsonl:{mc}", f"jsonl:{bad}"], ks=[1], limit=4, out_dir=tmp_path / "o1")
  assert calls == [] and not (tmp_path / "o1").exists()  # nothing scored, nothing written

  text = tmp_path / "doc.txt"
  text.write_text("Return a new list containing the items.\n")

  def out_of_memory(prep, *a):  # a failure only scoring can reveal (the real one: device OOM)
    if prep.task.kind == "ppl":
      raise MemoryError("simulated out of memory")
    return real_run(prep, *a)

  monkeypatch.setattr(runner, "_run", out_of_memory)
  out = tmp_path / "o2"
  with pytest.raises(MemoryError):
    evaluate(cfg, params, tok, [f"jsonl:{mc}", f"ppl:{text}"], ks=[1, 4], limit=4, out_dir=out, n_boot=10)
  summary = report.load_summary(out)
  assert list(summary["tasks"]) == ["jsonl:mc_eval"] and summary["tasks"]["jsonl:mc_eval"]["n"] == 4
  assert summary["meta"]["incomplete"]["failed_task"] == "ppl:doc"
  assert "**Incomplete:** task `ppl:doc` failed" in (out / "results.md").read_text()
  assert len(report.load_samples(out, "jsonl:mc_eval", 4)) == 4


def test_plot_panels_follow_the_tasks_present():
  def entry(kind):
    return {"kind": kind, "primary": "acc", "by_k": {"1": {"acc": 0.5}}}
  ppl_only = {"meta": {"ks": [1]}, "tasks": {"ppl:a": entry("ppl")}}
  assert [p[0] for p in report.metric_panels(ppl_only)] == ["perplexity"]
  mixed = {"meta": {"ks": [1]}, "tasks": {"jsonl:a": entry("mc"), "ppl:b": entry("ppl")}}
  assert [(p[0], list(p[1])) for p in report.metric_panels(mixed)] == [("accuracy", ["jsonl:a"]),
                                                                        ("perplexity", ["ppl:b"])]


def test_cli_help_documents_local_formats_and_backend_probe_is_quiet():
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="")  # let jax probe every plugin, as on a user's machine
  out = subprocess.run([sys.executable, "-m", "phds_jax.eval", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)  # absl exits 1 after --help
  for needle in ("jsonl:PATH", '"choices"', "ppl:PATH", ".parquet", "--prefix_token_id"):
    assert needle in out.stdout
  missing = subprocess.run([sys.executable, "-m", "phds_jax.eval", f"--checkpoint={DEMO}", "--ks=1",
                            "--tasks=ppl:/nonexistent.txt", "--out=/tmp/unused"], capture_output=True, text=True,
                           env=env, timeout=120)
  assert missing.returncode == 2 and "error: /nonexistent.txt: no such file" in missing.stderr
  assert "Traceback" not in missing.stderr and "Unable to initialize backend" not in missing.stderr
