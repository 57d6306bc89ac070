"""Data layer tests: sources and their errors, chat templates vs transformers, loss masks, packing, Grain state."""

import json
import os

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from phds_jax import data as D

SPECIALS = ["<pad>", "<unk>", "<s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A Qwen-like ChatML template: whitespace control, a default system prompt, raise_exception, {% generation %}.
CKPT_TEMPLATE = """{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen3-like: the last assistant turn gets an empty think block, earlier ones do not (not incremental).
THINK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "general kenobi, café ☕"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "quick brown fox\nsecond line"},
]
WORDS = "hello world how are you the quick brown fox jumps over a lazy dog system user assistant".split()


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A checkpoint dir with a small byte-level BPE tokenizer and a ChatML-like template."""
  d = tmp_path_factory.mktemp("ckpt")
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4, trainer)
  tok.save(str(d / "tokenizer.json"))
  config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>", "add_bos_token": False,
            "chat_template": CKPT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}
  (d / "tokenizer_config.json").write_text(json.dumps(config))
  return str(d)


@pytest.fixture(scope="module")
def tok(ckpt):
  return D.ChatTokenizer.from_dir(ckpt)


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(row if isinstance(row, str) else json.dumps(row, ensure_ascii=False))
      f.write("\n")
  return str(path)


def _chat(i, rng):
  """A unique conversation of random length (1-2 exchanges)."""
  words = lambda n: " ".join(rng.choice(WORDS, size=n))
  msgs = [{"role": "user", "content": f"q{i} {words(rng.integers(1, 12))}"},
          {"role": "assistant", "content": f"a{i} {words(rng.integers(1, 10))}"}]
  if i % 3 == 0:
    msgs += [{"role": "user", "content": words(3)}, {"role": "assistant", "content": words(2)}]
  return {"messages": msgs}


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
  rng = np.random.default_rng(0)
  records = [_chat(i, rng) for i in range(40)]
  return records, _write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", records)


def _cfg(path, **kw):
  base = dict(path=path, max_len=128, batch_size=3, num_threads=1, shard_index=0, shard_count=1, seed=1)
  return {**base, **kw}


def _segments(batches):
  """Every packed example as (tokens, targets, loss_mask) tuples, in order."""
  out = []
  for b in batches:
    for r in range(b["tokens"].shape[0]):
      for s in range(1, b["segment_ids"][r].max() + 1):
        sel = b["segment_ids"][r] == s
        out.append((tuple(b["tokens"][r, sel]), tuple(b["targets"][r, sel]), tuple(b["loss_mask"][r, sel])))
  return out


def _runs(mask):
  """Index ranges of the contiguous runs of ones in `mask`."""
  idx = np.flatnonzero(mask)
  return np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if len(idx) else []


# ------------------------------------------------------------------------------------------------ sources


def test_jsonl_chat_instruction_text_and_fields(tmp_path):
  p = _write_jsonl(tmp_path / "mix.jsonl", [
      {"messages": CHAT, "id": 7}, "",
      {"instruction": "Add.", "input": "1+1", "output": "2"},
      {"instruction": "Say hi.", "output": "hi"},
      {"text": "plain text"}])
  src = D.JsonlSource(p)
  assert len(src) == 4
  assert src[0]["messages"] == CHAT and src[0]["_id"] == f"{p}:1"
  assert src[1]["messages"] == [{"role": "user", "content": "Add.\n\n1+1"}, {"role": "assistant", "content": "2"}]
  assert src[2]["messages"][0]["content"] == "Say hi." and src[2]["_id"] == f"{p}:4"  # Line 2 is blank.
  assert src[3] == {"text": "plain text", "_id": f"{p}:5"}
  q = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "why?", "answer": "because"}])
  rec = D.JsonlSource(q, fmt="instruction", fields={"instruction": "question", "output": "answer"})[0]
  assert rec["messages"][1] == {"role": "assistant", "content": "because"}


def test_json_array_and_json_lines(tmp_path):
  alpaca = [{"instruction": "Add.", "input": "", "output": "2"}, {"instruction": "Hi.", "output": 5}]
  (tmp_path / "alpaca.json").write_text(json.dumps(alpaca, indent=1))
  with pytest.raises(D.DataError, match=r"alpaca\.json: item 1: 'output' must be a string"):
    D.open_source(str(tmp_path / "alpaca.json"))
  src = D.open_source(str(tmp_path / "alpaca.json"), on_error="skip")
  assert len(src) == 1 and src[0]["messages"][0]["content"] == "Add."  # Empty input adds nothing.
  (tmp_path / "broken.json").write_text('[{"instruction": "a",\n "output": }]')
  with pytest.raises(D.DataError, match=r"broken\.json:2: malformed JSON"):
    D.open_source(str(tmp_path / "broken.json"))
  lines = _write_jsonl(tmp_path / "lines.json", [{"text": "a b"}, {"text": "c"}])
  assert len(D.open_source(lines)) == 2


def test_parquet_and_text_sources(tmp_path):
  rows = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
  src = D.open_source(str(tmp_path / "c.parquet"))
  assert len(src) == 2 and src[1]["messages"] == CHAT[1:3] and src[1]["_id"].endswith("c.parquet: row 1")
  (tmp_path / "a.txt").write_text("first para\nline two\n\n\nsecond para\n")
  (tmp_path / "b.txt").write_text("\nother file\n")
  whole = D.open_source(str(tmp_path / "*.txt"))
  assert [whole[i]["text"] for i in range(2)] == ["first para\nline two\n\n\nsecond para", "other file"]
  blocks = D.open_source(str(tmp_path / "*.txt"), text_unit="blank_line")
  assert [blocks[i]["text"] for i in range(3)] == ["first para\nline two", "second para", "other file"]
  assert [blocks[i]["_id"].rsplit("/", 1)[1] for i in range(3)] == ["a.txt:1", "a.txt:5", "b.txt:2"]


BAD = [
    ("{not json", "Expecting property name"),
    ({"messages": [{"role": "user"}]}, "needs 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "must be a string"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"instruction": "x"}, "cannot tell the format"),
    ({"messages": "hi"}, "must be a non-empty list"),
]


@pytest.mark.parametrize("bad,reason", BAD)
def test_bad_record_names_file_and_line(tmp_path, bad, reason):
  p = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": CHAT}, bad, {"messages": CHAT}])
  with pytest.raises(D.DataError, match=rf"bad\.jsonl:2: .*{reason}"):
    D.JsonlSource(p)
  lazy = D.JsonlSource(p, validate=False)  # Access-time validation names the line too.
  assert len(lazy) == 3 and lazy[0] is not None
  with pytest.raises(D.DataError, match=rf"bad\.jsonl:2: .*{reason}"):
    lazy[1]


def test_raw_records_and_exact_text_are_what_evaluation_reads(tmp_path):
  """fmt="raw" hands each record over as plain Python (a task's own schema, unchecked), text_unit="exact" a .txt
  file byte for byte named by the file alone; a bad line is named as in training."""
  from phds_jax.evaluation import records  # pylint: disable=g-import-not-at-top  (the reader built on these)
  p = _write_jsonl(tmp_path / "mc.jsonl", [{"context": "c", "choices": ["a", "b"], "gold": 1}, "", {"x": [1]}])
  src = D.open_source(p, fmt="raw", validate=False)
  assert len(src) == 2 and src[1] == {"x": [1], "_id": f"{p}:3"}
  assert records.read_file(p, limit=1) == [(f"{p}:1", {"context": "c", "choices": ["a", "b"], "gold": 1})]
  (tmp_path / "doc.txt").write_text("\nfirst line\n\n")
  exact = D.open_source(str(tmp_path / "doc.txt"), fmt="raw", text_unit="exact")
  assert len(exact) == 1 and exact[0] == {"text": "\nfirst line\n\n", "_id": str(tmp_path / "doc.txt")}
  bad = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": CHAT}, "{oops"])
  with pytest.raises(D.DataError, match=r"bad\.jsonl:2: invalid JSON") as trained:
    D.JsonlSource(bad)
  with pytest.raises(records.EvalDataError, match=r"bad\.jsonl:2: invalid JSON") as evaluated:
    records.read_file(bad)
  assert str(trained.value) == str(evaluated.value) and isinstance(evaluated.value, D.DataError)
  with pytest.raises(ValueError, match="format='raw'"):
    D.DataConfig(path=p, format="raw")  # a source format only, not a training one


def test_empty_files_and_parquet_rows(tmp_path):
  (tmp_path / "e.jsonl").write_text("\n  \n")
  with pytest.raises(D.DataError, match=r"e\.jsonl: empty"):
    D.open_source(str(tmp_path / "e.jsonl"))
  (tmp_path / "e.txt").write_text("")
  with pytest.raises(D.DataError, match=r"e\.txt: empty"):
    D.open_source(str(tmp_path / "e.txt"))
  with pytest.raises(D.DataError, match="no files match"):
    D.open_source(str(tmp_path / "missing*.jsonl"))
  rows = [{"messages": CHAT[1:3]}, {"messages": [{"role": "user", "content": "only a question"}]}]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
  with pytest.raises(D.DataError, match=r"b\.parquet: row 1: no assistant turn"):
    D.open_source(str(tmp_path / "b.parquet"))


def test_skip_mode_counts_and_reports(tmp_path, caplog):
  rows = [{"messages": CHAT}] + [bad for bad, _ in BAD] + [{"messages": CHAT[1:3]}]
  p = _write_jsonl(tmp_path / "mixed.jsonl", rows)
  stats = D.DataStats()
  with caplog.at_level("WARNING", logger="phds_jax.data"):
    src = D.open_source(p, on_error="skip", stats=stats)
  assert len(src) == 2 and stats["bad_record"] == len(BAD)
  assert [r.split(": ")[0].rsplit("/", 1)[1] for r in stats.reasons["bad_record"]] == [f"mixed.jsonl:{i}"
                                                                                         for i in range(2, 7)]
  assert "mixed.jsonl:2" in caplog.text and "skipped 7 bad records" in caplog.text
  lazy_stats = D.DataStats()  # validate=False: bad records come back as None, grain drops them, still counted.
  lazy = D.open_source(p, on_error="skip", validate=False, stats=lazy_stats)
  assert len(lazy) == len(rows) and lazy[1] is None and lazy_stats["bad_record"] == 1


def _tiny_builder():
  """A tfds builder defined (and registered) only when needed, so tfds is imported by this test alone."""
  import tensorflow_datasets as tfds

  class PhdsTinySft(tfds.core.GeneratorBasedBuilder):
    # A top-level module name stops tfds from locating the builder's code via `importlib_resources`, which tfds
    # needs (for builders defined inside packages) but does not install; reading prepared data does not need it.
    __module__ = "phds_tiny_sft"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      feats = tfds.features.FeaturesDict({"question": tfds.features.Text(), "answer": tfds.features.Text()})
      return tfds.core.DatasetInfo(builder=self, features=feats)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"question": f"q{i} hello", "answer": f"a{i} world"}

  return PhdsTinySft


def test_tfds_source_from_local_builder(tmp_path, tok):
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  builder = _tiny_builder()(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()  # Writes ArrayRecord files; works without TensorFlow.
  fields = {"instruction": "question", "output": "answer"}
  src = D.open_source(tfds_name="phds_tiny_sft", split="train", data_dir=str(tmp_path), fields=fields)
  assert len(src) == 6
  rec = src[0]
  assert rec["_id"] == "tfds:phds_tiny_sft/train[0]" and rec["messages"][0]["content"].endswith("hello")
  batches = list(D.make_dataset(_cfg(None, tfds_name="phds_tiny_sft", split="test", data_dir=str(tmp_path),
                                     fields=fields, batch_size=1), tok))
  assert sum(b["segment_ids"].max() for b in batches) == 2
  with pytest.raises(D.DataError, match="tfds:nope/train"):
    D.open_source(tfds_name="nope", data_dir=str(tmp_path))


def test_holdout_split():
  mask = D.holdout_mask(10_000, 0.1, seed=3)
  assert 900 < mask.sum() < 1100 and np.array_equal(mask, D.holdout_mask(10_000, 0.1, seed=3))
  assert not np.array_equal(mask, D.holdout_mask(10_000, 0.1, seed=4))
  train, val = D.holdout_split(list(range(100)), 0.2)
  assert sorted(list(train.indices) + list(val.indices)) == list(range(100)) and len(val) > 5


# ------------------------------------------------------------------------------------------------ templates


@pytest.fixture(scope="module")
def hf_tok(ckpt):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(ckpt)  # Reads the same tokenizer.json + tokenizer_config.json.


@pytest.mark.parametrize("name", ["checkpoint", "tulu", "chatml", "think"])
def test_rendering_matches_transformers(tok, hf_tok, name):
  template = {"checkpoint": CKPT_TEMPLATE, "think": THINK_TEMPLATE}.get(name) or D.BUILTIN_TEMPLATES[name]
  for msgs in (CHAT, CHAT[1:], CHAT[1:4]):
    for gen in (False, True):
      ours = D.render(template, msgs, gen, **tok.special_tokens)
      ref = hf_tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)
      assert ours == ref, (name, len(msgs), gen)
  if name == "checkpoint":  # The checkpoint's own template, found and tokenized as transformers does.
    ref_ids = hf_tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert tok.encode_chat(CHAT)[0].tolist() == list(ref_ids)


def test_template_raise_exception(tok):
  with pytest.raises(D.TemplateError, match="unknown role tool"):
    tok.render([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("name,end", [("checkpoint", "<|im_end|>"), ("tulu", "<|im_end|>"), ("chatml", "<|im_end|>")])
def test_loss_mask_only_on_assistant_tokens(ckpt, name, end):
  tok = D.ChatTokenizer.from_dir(ckpt, template=name)
  ids, trained = tok.encode_chat(CHAT)
  ex = D.make_example(ids, trained)
  decode = lambda x: tok.tokenizer.decode(list(x), skip_special_tokens=False)
  assert decode(ex["tokens"]) == tok.render(CHAT)  # The tokenization round-trips the rendered text.
  runs = _runs(ex["loss_mask"])
  replies = [m["content"] + end for m in CHAT if m["role"] == "assistant"]
  assert [decode(ex["targets"][r]) for r in runs] == replies
  assert ex["loss_mask"][-1] == 0 and ex["targets"][-1] == 0
  # Each reply starts right after its generation prompt, which is not trained.
  assert decode(ex["tokens"][: runs[0][0] + 1]).endswith("assistant\n" if name != "tulu" else "<|assistant|>\n")


def test_loss_mask_non_incremental_template(tok):
  think = D.ChatTokenizer(tok.tokenizer, THINK_TEMPLATE, tok.special_tokens)
  ids, trained = think.encode_chat(CHAT)
  decode = lambda x: tok.tokenizer.decode(list(x), skip_special_tokens=False)
  assert [decode(ids[r]) for r in _runs(trained)] == [
      CHAT[2]["content"] + "<|im_end|>", "<think>\n\n</think>\n\n" + CHAT[4]["content"] + "<|im_end|>"]


def test_template_selection(tmp_path, ckpt, tok):
  assert tok.template == CKPT_TEMPLATE and tok.text_bos is False
  plain = tmp_path / "plain"
  plain.mkdir()
  (plain / "tokenizer.json").write_text(open(os.path.join(ckpt, "tokenizer.json")).read())
  (plain / "chat_template.jinja").write_text(D.TULU_TEMPLATE)
  assert D.ChatTokenizer.from_dir(str(plain)).template == D.TULU_TEMPLATE
  os.remove(plain / "chat_template.jinja")
  assert D.ChatTokenizer.from_dir(str(plain)).template == D.CHATML_TEMPLATE  # Vocab has <|im_start|>.
  with pytest.raises(ValueError, match="no chat_template"):
    D.ChatTokenizer.from_dir(str(plain), template="checkpoint")


def test_text_examples(tok):
  ids, trained = tok.encode_text("hello world")
  assert ids[-1] == tok.eos_id and ids[0] != tok.bos_id and trained.all()
  with_bos = D.ChatTokenizer(tok.tokenizer, tok.template, tok.special_tokens, text_bos=True)
  assert with_bos.encode_text("hello world")[0][0] == tok.bos_id
  ex = D.make_example(ids, trained)
  np.testing.assert_array_equal(ex["targets"][:-1], ids[1:])
  np.testing.assert_array_equal(ex["loss_mask"], [1] * (len(ids) - 1) + [0])
  cut = D.make_example(ids, trained, max_len=2)  # Truncated: the first cut-off token is the last target.
  np.testing.assert_array_equal(cut["targets"], ids[1:3])
  np.testing.assert_array_equal(cut["loss_mask"], [1, 1])


# ------------------------------------------------------------------------------------------------ pipeline


def _expected(tok, records):
  return sorted(tuple(tok.encode(r)[0]) for r in records)


def test_packing_invariants_and_token_accounting(tok, chats):
  records, path = chats
  batches = list(D.make_dataset(_cfg(path), tok))
  for b in batches:
    assert set(b) == set(D.BATCH_SPEC)
    for k, dtype in D.BATCH_SPEC.items():
      assert b[k].dtype == dtype and b[k].shape == (3, 128)
    for r in range(3):
      seg, pos = b["segment_ids"][r], b["positions"][r]
      n = int((seg > 0).sum())
      assert (seg[n:] == 0).all() and (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
      assert (b["loss_mask"][r, n:] == 0).all() and (b["tokens"][r, n:] == 0).all()
      for s in range(1, seg.max() + 1):
        sel = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(pos[sel], np.arange(len(sel)))  # Positions restart per segment.
        np.testing.assert_array_equal(b["targets"][r, sel[:-1]], b["tokens"][r, sel[1:]])  # Shift within segment.
        assert b["loss_mask"][r, sel[-1]] == 0 and b["targets"][r, sel[-1]] == 0  # Nothing crosses segments.
  segs = _segments(batches)
  assert sorted(s[0] for s in segs) == _expected(tok, records)  # Every example exactly once, whole.
  tokens_in = sum(len(tok.encode(r)[0]) for r in records)
  assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == tokens_in
  assert sum(b["segment_ids"].max(axis=1).sum() for b in batches) == len(records)
  assert max(b["segment_ids"].max() for b in batches) >= 2  # Rows really hold several examples.
  none = list(D.make_dataset(_cfg(path, packing="none"), tok))
  assert all(b["segment_ids"].max() <= 1 for b in none) and len(_segments(none)) == len(records)
  best = list(D.make_dataset(_cfg(path, packing="best_fit", pack_bins=6), tok))
  assert sorted(s[0] for s in _segments(best)) == _expected(tok, records)


def test_determinism_seeds_and_epochs(tok, chats):
  records, path = chats
  order = lambda bs: [s[0] for s in _segments(bs)]
  a = list(D.make_dataset(_cfg(path, seed=5), tok))
  b = list(D.make_dataset(_cfg(path, seed=5, num_threads=2), tok))
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)
  assert order(D.make_dataset(_cfg(path, seed=6), tok)) != order(a)
  two = order(D.make_dataset(_cfg(path, seed=5, num_epochs=2), tok))
  assert sorted(two) == sorted(_expected(tok, records) * 2)
  first = set(two[:30])  # Epoch 2 is reshuffled: its start differs from epoch 1's.
  assert two[len(records):len(records) + 10] != two[:10] and len(first) == 30


def test_shards_are_disjoint_and_cover(tok, chats):
  records, path = chats
  shards = [sorted(s[0] for s in _segments(D.make_dataset(_cfg(path, shard_index=i, shard_count=3), tok)))
            for i in range(3)]
  assert sum(len(s) for s in shards) == len(records)
  assert sorted(sum(shards, [])) == _expected(tok, records)
  assert not set(shards[0]) & set(shards[1]) and not set(shards[1]) & set(shards[2])


def test_heldout_part(tok, chats):
  records, path = chats
  kw = dict(validation_fraction=0.25, holdout_seed=1)
  train = [s[0] for s in _segments(D.make_dataset(_cfg(path, **kw), tok))]
  val = [s[0] for s in _segments(D.make_dataset(_cfg(path, part="validation", shuffle=False, **kw), tok))]
  assert sorted(train + val) == _expected(tok, records) and 0 < len(val) < len(train)


@pytest.mark.parametrize("threads", [1, 2])
def test_iterator_state_restores_exactly(tok, chats, tmp_path, threads):
  _, path = chats
  cfg = _cfg(path, num_epochs=None, num_threads=threads, prefetch=8)
  it = D.make_dataset(cfg, tok)
  for _ in range(11):  # Past the end of the first epoch (40 records ~ 9 batches).
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON-able, as grain's Orbax handler stores it.
  want = [next(it) for _ in range(4)]
  fresh = D.make_dataset(cfg, tok)
  fresh.set_state(state)
  got = [next(fresh) for _ in range(4)]
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(want, got) for k in x)
  import orbax.checkpoint as ocp  # The trainer's way: grain's Orbax handler inside a CheckpointManager.
  manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
  manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(fresh)))
  manager.wait_until_finished()
  again = D.make_dataset(cfg, tok)
  manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(again)))
  x, y = next(fresh), next(again)
  assert all(np.array_equal(x[k], y[k]) for k in x)


def test_overlong_policies(tok, chats):
  records, path = chats
  lens = [len(tok.encode(r)[0]) for r in records]
  max_len = 60
  n_long = sum(n > max_len for n in lens)
  assert 0 < n_long < len(records)
  with pytest.raises(D.DataError, match=r"chats\.jsonl:\d+: \d+ tokens > max_len 60"):
    list(D.make_dataset(_cfg(path, max_len=max_len, num_threads=2), tok))
  stats = D.DataStats()
  skipped = _segments(D.make_dataset(_cfg(path, max_len=max_len, overlong="skip"), tok, stats=stats))
  assert stats["overlong_skip"] == n_long and len(skipped) == len(records) - n_long
  stats = D.DataStats()
  cut = _segments(D.make_dataset(_cfg(path, max_len=max_len, overlong="truncate"), tok, stats=stats))
  kept = [min(n, max_len) for r, n in zip(records, lens) if D.make_example(*tok.encode(r), max_len)["loss_mask"].any()]
  assert stats["overlong_truncate"] == n_long and stats["no_loss_tokens"] == len(records) - len(kept)
  assert sorted(len(s[0]) for s in cut) == sorted(kept) and max(kept) == max_len


def test_text_pipeline_and_template_errors(tok, tmp_path, chats):
  _, path = chats
  p = _write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(WORDS[: i + 2])} for i in range(6)])
  segs = _segments(D.make_dataset(_cfg(p, shuffle=False), tok))
  assert [s[0] for s in segs] == [tuple(tok.encode_text(" ".join(WORDS[: i + 2]))[0]) for i in range(6)]
  assert all(s[2] == (1,) * (len(s[0]) - 1) + (0,) and s[0][-1] == tok.eos_id for s in segs)
  picky = "{% if messages|length > 2 %}{{ raise_exception('too long') }}{% endif %}" + D.CHATML_TEMPLATE
  with pytest.raises(D.DataError, match=r"chats\.jsonl:\d+: chat template failed: too long"):
    list(D.make_dataset(_cfg(path, template=picky), tok))
  stats = D.DataStats()
  segs = _segments(D.make_dataset(_cfg(path, template=picky, on_error="skip"), tok, stats=stats))
  assert stats["bad_record"] == 14 and len(segs) == 26  # Every third chat has two exchanges.


def test_sources_pickle(tmp_path, chats, tok):
  import pickle
  _, path = chats
  pq.write_table(pa.Table.from_pylist([{"messages": CHAT}]), tmp_path / "c.parquet")
  for src in (D.open_source(path), D.open_source(str(tmp_path / "c.parquet"))):
    first = src[0]  # Opens the file / table, which must not be pickled.
    assert pickle.loads(pickle.dumps(src))[0] == first
  transform = pickle.loads(pickle.dumps(D.Tokenize(tok, 128)))  # For grain worker processes.
  assert transform({"messages": CHAT})["tokens"].tolist() == tok.encode_chat(CHAT)[0].tolist()


def test_config_forms(tok, ckpt, chats):
  import ml_collections
  _, path = chats
  cfg = ml_collections.ConfigDict(_cfg(path))
  a = next(D.make_dataset(cfg, tok))
  b = next(D.make_dataset(D.as_config(None, **_cfg(path)), ckpt))  # Tokenizer loaded from the checkpoint dir.
  assert all(np.array_equal(a[k], b[k]) for k in a)
  with pytest.raises(ValueError, match="unknown data config fields"):
    D.as_config({"path": path, "batchsize": 2})
  with pytest.raises(ValueError, match="overlong"):
    D.DataConfig(path=path, overlong="drop")
