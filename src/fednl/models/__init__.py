"""Models: backbone loading, the Titans dual-path conversion, LoRA, parameter groups and streaming.

Importing this package does not import ``transformers`` (it is imported when a backbone is loaded or converted).

Main entry points::

    model = build_model("titans", ModelConfig(source="smollm2"), MemoryConfig(attn_window=512), LoraConfig(), seed=0)
    model = build_model(ModelSpec(kind="floral", params={"n_adaptors": 3}), ModelConfig(source="tiny"))
    groups = param_groups(model)          # {"frozen", "lora", "rule", "gate"} -> parameter names
    lm = StreamingLM(model); logprobs = lm.feed(ids)

``python -m fednl.models groups --source smollm2 --kind titans --targets all`` prints parameter-group counts.
"""

from fednl.models.build import build_lora, build_model, build_titans, model_kinds, register_model_kind
from fednl.models.spec import ModelSpec
from fednl.models.config import LLAMA_LINEARS, QKV, LoraConfig, MemoryConfig, ModelConfig
from fednl.models.groups import (
    BASE_GROUPS,
    format_group_table,
    group_counts,
    group_tensors,
    param_groups,
    print_group_counts,
)
from fednl.models.loading import (
    cache_dir,
    clear_backbone_cache,
    find_smollm2_gguf,
    load_backbone,
    smollm2_available,
)
from fednl.models.lora import LoRALinear, inject_lora, lora_modules
from fednl.models.streaming import StreamingLM
from fednl.models.titans import TitansAttention, convert_to_titans, set_gate_override, titans_layers
from fednl.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = [
    "BASE_GROUPS",
    "LLAMA_LINEARS",
    "QKV",
    "ByteTokenizer",
    "HFTokenizer",
    "LoRALinear",
    "LoraConfig",
    "MemoryConfig",
    "ModelConfig",
    "ModelSpec",
    "StreamingLM",
    "TitansAttention",
    "Tokenizer",
    "build_lora",
    "build_model",
    "build_titans",
    "cache_dir",
    "clear_backbone_cache",
    "convert_to_titans",
    "find_smollm2_gguf",
    "format_group_table",
    "group_counts",
    "group_tensors",
    "inject_lora",
    "load_backbone",
    "lora_modules",
    "model_kinds",
    "param_groups",
    "print_group_counts",
    "register_model_kind",
    "set_gate_override",
    "smollm2_available",
    "titans_layers",
]
