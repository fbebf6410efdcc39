"""The decoder-only transformer (pure PyTorch), its position encodings and named sizes."""

from smallscale.model.gpt import GPT, GPTConfig, GPTOutput, KVCache
from smallscale.model.positions import PositionEncoding
from smallscale.model.presets import PRESETS, preset_config, preset_table

__all__ = [
    "GPT",
    "GPTConfig",
    "GPTOutput",
    "KVCache",
    "PRESETS",
    "PositionEncoding",
    "preset_config",
    "preset_table",
]
