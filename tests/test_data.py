"""Data loading, the calibration sampler, perplexity windows and perplexity (offline)."""

import gzip
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from admm_prune.gpu.data.corpus import (
    DataError,
    load_texts,
    perplexity,
    perplexity_text,
    sample_calibration,
    tokenize_for_perplexity,
)
from admm_prune.gpu.checkpoint.models import tiny_model, tiny_tokenizer

SHARED_DATA = Path(os.environ.get("ADMM_PRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
C4_1000 = SHARED_DATA / "c4" / "c4_train_first1000_reserialized.jsonl"
C4_FIRST5 = SHARED_DATA / "c4" / "c4-train.00000-of-01024.first5.json"
WIKI_VALID = SHARED_DATA / "wikitext-2-raw" / "wiki.valid.raw"


def shared(path):
    if not path.is_file():
        pytest.skip(f"shared data file {path} absent (set ADMM_PRUNE_DATA to the shared/data folder)")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


# --- local loaders -----------------------------------------------------------------------


def test_txt_rows_follow_the_hf_wikitext_split(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(" \n = Title = \n \n Body line .\nlast", encoding="utf-8")
    assert load_texts(path) == ["", " = Title = \n", "", " Body line .\n", "last"]


def test_jsonl_json_lines_and_json_list(tmp_path):
    rows = [{"text": "first doc", "url": "u"}, {"text": "second doc"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    assert load_texts(tmp_path / "a.jsonl") == ["first doc", "second doc"]
    assert load_texts(tmp_path / "b.json") == ["first doc", "second doc"]


def test_parquet(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["x y", "z"], "id": [1, 2]}), tmp_path / "d.parquet")
    assert load_texts(str(tmp_path / "d.parquet")) == ["x y", "z"]


def test_directory_reads_supported_files_in_sorted_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from b"}))
    (tmp_path / "a.txt").write_text("from a\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_texts(tmp_path) == ["from a\n", "from b"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", "", "holds no text"),
        ("blank.txt", " \n\n \n", "holds no text"),
        ("notext.jsonl", json.dumps({"body": "x"}), "no string 'text' field"),
        ("bad.json", "{not json", "not JSON"),
        ("table.csv", "text\nx\n", "unsupported file type"),
    ],
)
def test_bad_files_raise_data_error_naming_the_path(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        load_texts(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl", "latin1.json.gz"])
def test_non_utf8_file_is_a_data_error_naming_file_and_byte(tmp_path, name):
    path = tmp_path / name
    content = 'caf\u00e9 ok\n{"text": "na\u00efve"}\n'.encode("latin-1")  # é = 0xe9 at byte 3
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    with pytest.raises(DataError, match=r"not UTF-8 text: byte 3 \(line 1") as error:
        load_texts(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_parquet_without_text_column(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match="no 'text' column"):
        load_texts(tmp_path / "d.parquet")


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="nor an existing file"):
        load_texts(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="directory holds no"):
        load_texts(tmp_path)


@pytest.mark.parametrize("flag", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
@pytest.mark.parametrize("source", ["c4", "wikitext2"])
def test_hub_sources_fail_fast_when_offline(monkeypatch, flag, source):
    for other in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # CI sets both
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(flag, "1")
    start = time.perf_counter()
    with pytest.raises(DataError, match=f"{flag}=1.*pass a local file"):
        load_texts(source)
    assert time.perf_counter() - start < 2


# --- calibration sampler -----------------------------------------------------------------


def long_docs(n, words):
    return [" ".join(f"d{d}w{w}" for w in range(words)) for d in range(n)]


def wanda_windows(texts, tokenizer, nsamples, seqlen, seed):
    """The same random calls, written out as in Wanda's get_c4 (one tokenizer call per draw);
    returns the windows and the documents drawn."""
    import random

    rng, windows, draws = random.Random(seed), [], []
    for _ in range(nsamples):
        while True:
            draws.append(rng.randint(0, len(texts) - 1))
            ids = tokenizer(texts[draws[-1]]).input_ids
            if len(ids) > seqlen:
                break
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return windows, draws


def test_random_window_mode_is_the_wanda_sampler(tokenizer):
    texts = long_docs(12, 40) + ["short"] * 8
    samples, info = sample_calibration(texts, tokenizer, nsamples=6, seqlen=32, seed=3)
    assert samples.shape == (6, 32) and samples.dtype == torch.long
    assert info["mode"] == "random-window" and info["long_documents"] >= 6
    assert samples.tolist() == wanda_windows(texts, tokenizer, 6, 32, seed=3)[0]


def test_documents_drawn_past_the_scanned_prefix_are_tokenized_in_batches(tokenizer):
    """One long document in 20, 600 documents: the prefix scan stops after 128; the draws
    beyond it are tokenized a batch at a time (with the documents the next draws pick if each
    is rejected), not one call per draw, and the windows are Wanda's."""
    texts = [" ".join(f"d{d}w{w}" for w in range(40 if d % 20 == 0 else 1)) for d in range(600)]
    calls = []

    def counting(batch, **kw):
        calls.append(len(batch))
        return tokenizer(batch, **kw)

    samples, info = sample_calibration(texts, counting, nsamples=6, seqlen=32, seed=3)
    expected, draws = wanda_windows(texts, tokenizer, 6, 32, seed=3)
    assert samples.tolist() == expected
    unseen = {i for i in draws if i >= info["documents_scanned"]}
    prefix_calls = info["documents_scanned"] // 64
    assert info["documents_scanned"] == 128 and len(unseen) > 40
    assert len(calls) - prefix_calls < len(unseen) / 4, (len(calls), len(unseen))


def test_sampler_is_deterministic_per_seed_and_differs_across_seeds(tokenizer):
    texts = long_docs(20, 30)
    a, info_a = sample_calibration(texts, tokenizer, 8, 24, seed=0)
    b, info_b = sample_calibration(texts, tokenizer, 8, 24, seed=0)
    c, info_c = sample_calibration(texts, tokenizer, 8, 24, seed=1)
    assert torch.equal(a, b) and info_a == info_b
    assert not torch.equal(a, c) and info_a["sha256"] != info_c["sha256"]


def test_concatenated_fallback_when_documents_are_short(tokenizer):
    texts = [f"doc {i} is short." for i in range(50)]  # 13-14 tokens each
    samples, info = sample_calibration(texts, tokenizer, nsamples=4, seqlen=64, seed=0)
    assert samples.shape == (4, 64)
    assert info["mode"] == "concatenated" and info["long_documents"] == 0
    assert info["documents"] == info["documents_scanned"] == 50
    eos = tokenizer.eos_token_id
    stream = samples.flatten().tolist()
    assert tokenizer.bos_token_id not in stream and stream.count(eos) >= 4
    pieces = tokenizer.decode(stream).split(tokenizer.eos_token)
    assert all(p in texts for p in pieces[1:-1])  # whole documents between separators
    again, _ = sample_calibration(texts, tokenizer, nsamples=4, seqlen=64, seed=0)
    assert torch.equal(samples, again)


def test_fallback_when_fewer_long_documents_than_samples(tokenizer):
    texts = long_docs(2, 40) + ["tiny"] * 30
    samples, info = sample_calibration(texts, tokenizer, nsamples=5, seqlen=32, seed=0)
    assert info["mode"] == "concatenated" and info["long_documents"] == 2
    assert samples.shape == (5, 32)


def test_fewer_windows_than_requested_and_too_little_text(tokenizer):
    # 3 documents of 10 byte tokens and 2 eos separators: 32 tokens, 4 windows of 8
    samples, info = sample_calibration(["abcdefghij"] * 3, tokenizer, nsamples=10, seqlen=8, seed=0)
    assert samples.shape == (4, 8) and info["nsamples"] == 4 and info["requested_nsamples"] == 10
    with pytest.raises(DataError, match="fewer than one window"):
        sample_calibration(["ab", "cd"], tokenizer, nsamples=1, seqlen=100, seed=0)
    with pytest.raises(DataError, match="texts is empty"):
        sample_calibration([], tokenizer, nsamples=1, seqlen=8, seed=0)
    with pytest.raises(ValueError, match="nsamples"):
        sample_calibration(["abc"], tokenizer, nsamples=0, seqlen=8, seed=0)


# --- perplexity ----------------------------------------------------------------------------


def test_perplexity_windows_count(tokenizer):
    text = "x" * 99  # bos + 99 byte tokens = 100 tokens
    windows = tokenize_for_perplexity(text, tokenizer, seqlen=30)
    assert windows.shape == (3, 30)
    assert windows.flatten().tolist() == tokenizer(text).input_ids[:90]
    with pytest.raises(DataError, match="fewer than one window"):
        tokenize_for_perplexity("x" * 10, tokenizer, seqlen=30)


def test_perplexity_equals_hand_computation():
    model, tokenizer = tiny_model("llama", seed=0)
    windows = torch.randint(0, len(tokenizer), (5, 17), generator=torch.Generator().manual_seed(0))
    window_losses = []
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0].double(), dim=-1)
            window_losses.append(-logp[torch.arange(16), w[1:]].mean().item())  # log p(w[t+1] | w[:t+1])
    expected = math.exp(sum(window_losses) / 5)
    for batch_size in (1, 2, 5):
        got = perplexity(model, windows, batch_size=batch_size, progress=False)
        assert abs(got - expected) < 1e-5 * expected


# --- the shared real data -------------------------------------------------------------------


def test_shared_c4_loads_and_matches_upstream_first_lines():
    texts = load_texts(shared(C4_1000))
    assert len(texts) == 1000 and all(texts)
    assert load_texts(shared(C4_FIRST5)) == texts[:5]  # upstream JSON-lines file, no final newline


def test_shared_wikitext_rows_and_perplexity_text():
    rows = load_texts(shared(WIKI_VALID))
    assert len(rows) == 3760
    assert rows[:3] == ["", " = Homarus gammarus = \n", ""]
    # The file starts " \n = Homarus gammarus = \n \n Homarus ..."; the HF split turns the
    # blank " " rows into "" and keeps the newline of the others, so "\n\n".join gives
    # "" + "\n\n" + " = Homarus gammarus = \n" + "\n\n" + "" + "\n\n" + " Homarus ...":
    text = perplexity_text(rows)
    assert text.startswith("\n\n = Homarus gammarus = \n\n\n\n\n Homarus gammarus , known as")
    lines = WIKI_VALID.read_text("utf-8").split("\n")[:-1]  # the file ends with a newline
    assert text == "\n\n".join(line + "\n" if line.strip() else "" for line in lines)


def test_shared_c4_calibration_with_tiny_tokenizer(tokenizer):
    texts = load_texts(shared(C4_1000))
    samples, info = sample_calibration(texts, tokenizer, nsamples=16, seqlen=256, seed=0)
    assert samples.shape == (16, 256) and info["mode"] == "random-window"
    assert info["documents_scanned"] < 1000  # the scan stops once enough long documents are seen
