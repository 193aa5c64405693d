"""Packages whose public names are imported on first use, so that importing the package
(or reading one light name from it) does not load torch, TUF or onnxruntime."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module

__all__ = ["lazy_names"]


def lazy_names(package: str, sources: Mapping[str, str]
               ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A module-level ``__getattr__`` and ``__dir__`` for ``package``: ``sources`` maps each
    public name to the module defining it (absolute, or relative to ``package``); the name
    is imported on first access and cached in the package."""
    module = sys.modules[package]

    def getattr_(name: str) -> object:
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(sources[name], package), name)
        setattr(module, name, value)
        return value

    def dir_() -> list[str]:
        return sorted(module.__all__)

    return getattr_, dir_
