"""Hardening round 4 (#28 item 21): the README's file map names every module where it lives,
says what each benchmark script does, and the peers' claim about which linears they prune
holds (before: BenchConfig placed in config.py, eight modules left out, benchmarks/ described as
two scripts, "the same seven linears as ours" on Phi-3 where the peer prunes two)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n{title}\n")
    end = README.index("\n## ", start + 1)
    return README[start:end]


def _file_map() -> dict[str, str]:
    rows = [line.split("|") for line in _section("## File map").splitlines() if line.startswith("| `")]
    return {row[1].strip().strip("`"): row[2] for row in rows}


@pytest.mark.parametrize("package", ["reference", "gpu"])
def test_the_file_map_names_every_module(package):
    text = _file_map()[f"{package}/"]
    missing = [str(p.relative_to(ROOT / package)) for p in sorted((ROOT / package).rglob("*.py"))
               if p.name != "__init__.py" and f"`{p.name}`" not in text]
    assert not missing, missing


def test_the_file_map_puts_each_config_class_where_it_is_defined():
    """`BenchConfig` in bench.py's entry, the engine's configs in config.py's."""
    from admm_prune.gpu import config
    from admm_prune.gpu.bench import bench

    text = _file_map()["gpu/"]
    for cls, module in [(bench.BenchConfig, "bench.py"), (config.PruneConfig, "config.py"),
                        (config.EvalConfig, "config.py")]:
        assert Path(sys.modules[cls.__module__].__file__).name == module
        said = re.search(rf"`{module}` \(([^;]*)", text)
        assert said and f"`{cls.__name__}`" in said[1], (cls.__name__, module)


def test_every_benchmark_script_has_its_line():
    section = _section("### Benchmarks")
    scripts = sorted(p.name for p in (ROOT / "benchmarks").iterdir() if p.suffix in (".py", ".sh"))
    lines = re.findall(r"^- `([^`]+)`: ", section, flags=re.MULTILINE)
    assert sorted(lines) == scripts


def test_the_caveat_of_a_new_setting_names_what_a_method_setting_needs():
    text = " ".join(_section("## Adding a method").split())
    assert "a new setting is one `option(...)` field" in text
    for needed in ("`SOLVER_KWARGS`", "`prune_layer`/`prune_shared` on both backends", "`Settings`"):
        assert needed in text, needed


@pytest.mark.parametrize("arch, peer", [
    ("llama", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]),
    ("phi3", ["self_attn.o_proj", "mlp.down_proj"]),
])
def test_the_peers_prune_what_their_docstring_says(arch, peer):
    pytest.importorskip("torch")
    from admm_prune.gpu.bench import peers
    from admm_prune.gpu.checkpoint import models
    from admm_prune.gpu.checkpoint.adapter import adapter

    model, _ = models.tiny_model(arch)
    ours = models.prunable_linears(models.decoder_layers(model)[0])
    assert peers.peer_linears(ours, adapter(model).block_prefix(0)) == peer
    assert "only ``o_proj`` and ``down_proj``" in " ".join(peers.__doc__.split())


@pytest.mark.parametrize("arch, ignore, warning", [
    ("phi3", (), "the peers prune self_attn.o_proj, mlp.down_proj in each block, ours self_attn.o_proj, "
                 "self_attn.qkv_proj, mlp.gate_up_proj, mlp.down_proj: their rows compare different work"),
    ("llama", ("o_proj",), "the peers prune self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, self_attn.o_proj, "
                           "mlp.gate_proj, mlp.up_proj, mlp.down_proj in each block, ours self_attn.q_proj, "
                           "self_attn.k_proj, self_attn.v_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj: their "
                           "rows compare different work"),
    ("llama", (), None),
])
def test_bench_warns_where_the_peers_prune_other_linears(arch, ignore, warning, tmp_path, monkeypatch, caplog):
    pytest.importorskip("torch")
    import logging

    from admm_prune.gpu.bench import bench
    from admm_prune.gpu.checkpoint import models

    class Stop(Exception):
        pass

    monkeypatch.setitem(sys.modules, "llmcompressor", types.SimpleNamespace(__version__="0-test"))
    monkeypatch.setattr(bench, "peer_available", lambda peer: None)
    monkeypatch.setattr(bench, "llmcompressor_prune", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    monkeypatch.setattr(bench, "perplexity", lambda *a, **k: 1.0)
    model, tok = models.tiny_model(arch)
    (tmp_path / "c.txt").write_text(" ".join(f"word{i}" for i in range(3000)))
    cfg = bench.BenchConfig(methods=("wanda",), settings=("0.5",), calib=str(tmp_path / "c.txt"),
                            eval=str(tmp_path / "c.txt"), nsamples=2, seqlen=16, eval_seqlen=16, device="cpu",
                            progress=False, peer_methods=("wanda",), ignore=ignore)
    with caplog.at_level(logging.WARNING), pytest.raises(Stop):
        bench.run_bench(cfg, model=model, tokenizer=tok)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == bench.log.name] == (
        [warning] if warning else [])
