"""lora_core: a small, exact LoRA implementation with PEFT-compatible adapter files.

    >>> from lora_core import LoraConfig, inject, save_adapter
    >>> inject(model, LoraConfig(r=8, alpha=16, targets=["q", "v"]))
    >>> ...train...
    >>> save_adapter(model, "out/adapter")   # loads with peft.PeftModel.from_pretrained
"""

from lora_core.config import LoraConfig
from lora_core.errors import LoraError
from lora_core.io import load_adapter, read_adapter_files, save_adapter
from lora_core.model import (
    active_adapter,
    adapter_info,
    adapter_names,
    adapters_disabled,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    inject,
    lora_weights,
    merge,
    merge_and_unload,
    set_active_adapter,
    set_trainable,
    unload,
    unmerge,
)

__all__ = [
    "LoraConfig",
    "LoraError",
    "active_adapter",
    "adapter_info",
    "adapter_names",
    "adapters_disabled",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "inject",
    "load_adapter",
    "lora_weights",
    "merge",
    "merge_and_unload",
    "read_adapter_files",
    "save_adapter",
    "set_active_adapter",
    "set_trainable",
    "unload",
    "unmerge",
]
