"""Text for calibration and perplexity: loading, the calibration sampler, perplexity windows.

Sources are the hub datasets the papers use (``"c4"``, ``"wikitext2"``) or local files, so that
everything runs offline given a file. The sampler is SparseGPT's/Wanda's (random windows of
documents longer than the window), with a documented fallback when too few documents are long.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .textfiles import LOCAL_SUFFIXES, DataError, read_file

logger = logging.getLogger(__name__)

HUB_SOURCES = ("c4", "wikitext2")
_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
_TRUE = {"1", "on", "yes", "true"}
_TOKENIZE_BATCH = 64


class HubUnreachable(DataError):
    """A hub dataset asked for while the hub cannot be reached. With `flag` (the option that named
    the source, which only the caller knows) the hint says how to pass a local copy instead."""

    LOCAL_COPY = {"c4": "c4-train.00000-of-01024.json.gz", "wikitext2": "wiki.test.raw"}

    def __init__(self, source, reason, flag=None):
        self.source, self.reason, self.flag = source, reason, flag
        said = f"{flag} {source}" if flag else source
        example = f"{flag} " if flag else ""
        super().__init__(f"{said}: the dataset hub is unreachable ({reason}); pass a local file instead "
                         f"(e.g. {example}/path/to/{self.LOCAL_COPY.get(source, 'data.jsonl')})")

    def __reduce__(self):
        return type(self), (self.source, self.reason, self.flag)


def hub_unreachable_reason(offline_vars=("HF_HUB_OFFLINE",), timeout=3.0):
    """Why the Hugging Face hub cannot be used now, or None.

    Checks the offline flags named in `offline_vars` first, then asks the hub endpoint once
    with a `timeout`-second limit, so that a machine without network fails fast instead of
    waiting through the download retries.
    """
    for var in offline_vars:
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]} is set"
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # any failure to get an answer means "unreachable"
        return f"{constants.ENDPOINT} did not answer ({type(error).__name__}: {error})"
    return None


def load_texts(source, split=None):
    """Documents of `source` as a list of strings.

    Parameters
    ----------
    source : "c4" | "wikitext2" | path
        A hub dataset (through `datasets.load_dataset`), or a local file or directory.
        Local formats: ``.txt``/``.raw``/``.tokens`` (WikiText layout: one row per line, as the HF split
        gives them), ``.jsonl``/``.json`` (one JSON object with a ``text`` field per line, or
        one JSON list; optionally ``.gz``), ``.parquet`` (a ``text`` column), or a directory
        of such files, read in sorted order. The names above always mean the hub; write
        ``./c4`` for a local directory of that name.
    split : str, optional
        Hub split; default ``"train"`` for c4 (``"validation"`` also known) and ``"test"``
        for wikitext2. Ignored for local paths.
    """
    if source in HUB_SOURCES:
        return _load_hub(source, split)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"{str(source)!r} is neither one of {HUB_SOURCES} nor an existing file or directory"
        )
    files = sorted(p for p in path.iterdir() if _is_local_file(p)) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: directory holds no {'/'.join(LOCAL_SUFFIXES)} files")
    texts = [text for file in files for text in read_file(file)]
    logger.info("loaded %d texts from %s", len(texts), path)
    return texts


def _is_local_file(path):
    return path.is_file() and path.name.endswith(LOCAL_SUFFIXES)


def _load_hub(source, split):
    reason = hub_unreachable_reason(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if reason is None:
        import datasets

        try:
            if source == "c4":
                split = split or "train"
                if split not in _C4_FILES:
                    raise DataError(f"split={split!r}: c4 has {sorted(_C4_FILES)}")
                data = datasets.load_dataset("allenai/c4", data_files={split: _C4_FILES[split]}, split=split)
            else:
                data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split or "test")
            return list(data["text"])
        except ConnectionError as error:
            reason = str(error)
    raise HubUnreachable(source, reason)


def perplexity_text(texts):
    """The evaluation text of the GPTQ/SparseGPT/Wanda perplexity code: rows joined by "\\n\\n"."""
    return "\n\n".join(texts)


class TokenCache:
    """Token counts of documents, tokenized in batches on first use as ``tokenizer(text)``.

    Ids are kept only for documents longer than `seqlen` (the ones a window can come from).
    One cache serves every seed of the same texts, tokenizer and seqlen (the bench's seeds):
    which documents are scanned does not depend on the seed.
    """

    def __init__(self, texts, tokenizer, seqlen):
        self.texts, self.tokenizer, self.seqlen = texts, tokenizer, seqlen
        self.length = {}  # document index -> number of tokens
        self.long = {}  # document index -> token ids, for documents longer than seqlen

    def scan(self, indices):
        new = [i for i in indices if i not in self.length]
        if not new:
            return
        for i, ids in zip(new, self.tokenizer([self.texts[i] for i in new]).input_ids):
            self.length[i] = len(ids)
            if len(ids) > self.seqlen:
                self.long[i] = ids


def sample_calibration(texts, tokenizer, nsamples, seqlen, seed, cache: TokenCache | None = None):
    """`nsamples` windows of `seqlen` tokens from `texts`, and a dict saying how they were made.

    "random-window" (the SparseGPT/Wanda sampler, same random calls with ``random.Random(seed)``):
    pick a random document with more than `seqlen` tokens, then a random window in it. Used
    when at least `nsamples` documents are that long; documents are scanned in order, in
    batches, only until that many are found, so ``long_documents`` counts those seen in the
    ``documents_scanned`` first documents.

    "concatenated" (fallback): documents in a seeded random order, tokenized without special
    tokens, joined with the tokenizer's eos token, cut into consecutive windows. If there are
    fewer than `nsamples` windows of text, returns as many as there are (``info["nsamples"]``).

    `cache`: a `TokenCache` of the same texts, tokenizer and seqlen to reuse across seeds
    (another one is ignored); the windows are the same with or without it.

    Returns
    -------
    samples : LongTensor [nsamples, seqlen]
    info : dict with mode, long_documents, documents_scanned, documents, nsamples,
        requested_nsamples, seqlen, seed, sha256 (of the samples' int64 bytes)
    """
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not texts:
        raise DataError("texts is empty: no documents to sample calibration data from")
    rng = random.Random(seed)
    if cache is None or cache.texts is not texts or cache.tokenizer is not tokenizer or cache.seqlen != seqlen:
        cache = TokenCache(texts, tokenizer, seqlen)
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        cache.scan(range(start, min(start + _TOKENIZE_BATCH, len(texts))))
        if len(cache.long) >= nsamples:
            break
    long_documents, scanned = len(cache.long), len(cache.length)
    if long_documents >= nsamples:
        mode, windows = "random-window", _random_windows(cache, nsamples, seqlen, rng)
    else:
        mode, windows = "concatenated", _concatenated_windows(texts, tokenizer, nsamples, seqlen, rng)
        logger.warning(
            "only %d of %d documents are longer than %d tokens (%d needed); "
            "calibration windows are cut from concatenated documents",
            long_documents, len(texts), seqlen, nsamples,
        )
    samples = torch.tensor(windows, dtype=torch.long)
    info = {
        "mode": mode,
        "long_documents": long_documents,
        "documents_scanned": scanned,
        "documents": len(texts),
        "nsamples": len(windows),
        "requested_nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "sha256": hashlib.sha256(samples.numpy().tobytes()).hexdigest(),
    }
    return samples, info


def _random_windows(cache, nsamples, seqlen, rng):
    """SparseGPT/Wanda: rejection-sample a long document, then a window start. A document drawn
    before it is tokenized is tokenized in one batch with the ones drawn next if it is rejected."""
    windows = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(cache.texts) - 1)
            if i not in cache.length:  # with what rng draws next while each draw is rejected
                ahead, picks = random.Random(), [i]
                ahead.setstate(rng.getstate())  # a copy: rng itself does not advance
                while len(picks) < _TOKENIZE_BATCH and (j := ahead.randint(0, len(cache.texts) - 1)) not in cache.long:
                    picks += [j] if j not in cache.length else []
                cache.scan(dict.fromkeys(picks))  # each once
            if i in cache.long:
                break
        ids = cache.long[i]
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return windows


def _concatenated_windows(texts, tokenizer, nsamples, seqlen, rng):
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"fewer documents than windows are longer than seqlen {seqlen}, and the tokenizer has no "
                        f"eos token to join shorter ones with; give longer documents, a smaller seqlen, or a "
                        f"tokenizer with an eos token", field="seqlen")
    order = list(range(len(texts)))
    rng.shuffle(order)
    stream = []
    for start in range(0, len(order), _TOKENIZE_BATCH):
        batch = [texts[i] for i in order[start : start + _TOKENIZE_BATCH]]
        for ids in tokenizer(batch, add_special_tokens=False).input_ids:
            if ids:
                stream.extend(([eos] if stream else []) + ids)
        if len(stream) >= nsamples * seqlen:
            break
    count = min(nsamples, len(stream) // seqlen)
    if count == 0:
        raise DataError(f"texts hold {len(stream)} tokens, fewer than one window of seqlen {seqlen}", field="seqlen")
    if count < nsamples:
        logger.warning("texts hold only %d windows of %d tokens; using %d samples", count, seqlen, count)
    return [stream[k * seqlen : (k + 1) * seqlen] for k in range(count)]


def tokenize_for_perplexity(text, tokenizer, seqlen):
    """The standard protocol: tokenize `text` once, cut ⌊T/seqlen⌋ non-overlapping windows.

    Returns LongTensor [nwindows, seqlen]; the last T mod seqlen tokens are dropped.
    """
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    nwindows = ids.numel() // seqlen
    if nwindows == 0:
        raise DataError(f"text has {ids.numel()} tokens, fewer than one window of seqlen {seqlen}", field="seqlen")
    return ids[: nwindows * seqlen].view(nwindows, seqlen)


def perplexity(model, windows, batch_size=1, device=None, progress=True):
    """exp(mean over windows of the mean next-token cross-entropy), as SparseGPT/Wanda compute it.

    Parameters
    ----------
    windows : LongTensor [nwindows, seqlen]
    device : where to run; default: where the model's input embedding is.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [nwindows, seqlen >= 2], got shape {tuple(windows.shape)}")
    device = device or model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    losses = []
    try:
        with torch.no_grad():
            for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
                losses.append(nll.mean(dim=1).cpu())
    finally:
        model.train(was_training)
    return math.exp(torch.cat(losses).double().mean().item())
