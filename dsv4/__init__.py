"""dsv4: an inference engine for DeepSeek-V4.

The public names load on first use (module ``__getattr__``), so ``import dsv4`` stays cheap (no torch
import) and works while parts of the engine are still being written.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "dsv4.engine.llm",
    "SamplingParams": "dsv4.engine.sampling_params",
    "EngineConfig": "dsv4.engine.engine_config",
    "RequestOutput": "dsv4.engine.outputs",
    "ModelConfig": "dsv4.config",
}
__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "ModelConfig", "__version__"]

if TYPE_CHECKING:
    from dsv4.config import ModelConfig
    from dsv4.engine.engine_config import EngineConfig
    from dsv4.engine.llm import LLM
    from dsv4.engine.outputs import RequestOutput
    from dsv4.engine.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dsv4' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
