"""Lazy package exports: a package names what it exports and where each name lives, and a module is imported
only when one of its names is first used.

This is what lets ``import chroma_agent`` (and ``chroma_agent.voices``, ``chroma_agent.model``) cost nothing:
the protocol module, the realtime client and the LiveKit plugin in remote mode import from the package without
pulling in torch, and a user still writes ``from chroma_agent import Engine``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for `package`, whose public ``name`` lives in module ``exports[name]``."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals_ = importlib.import_module(package).__dict__
        globals_[name] = value  # found once: later uses are a plain attribute read
        return value

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | set(exports))

    return __getattr__, __dir__
