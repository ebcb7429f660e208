"""The registry of architectures: name -> Architecture subclass, filled by @register."""

from __future__ import annotations

from .base import Architecture

ARCHITECTURES: dict[str, type[Architecture]] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: make `cls` available as SAEConfig.activation == cls.name."""
    if cls.name in ARCHITECTURES and ARCHITECTURES[cls.name] is not cls:
        raise ValueError(f"two architectures are named {cls.name!r}: {ARCHITECTURES[cls.name]} and {cls}")
    ARCHITECTURES[cls.name] = cls
    return cls


def get_architecture(name: str) -> type[Architecture]:
    """The class registered as `name`; ValueError listing the names otherwise."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown activation {name!r}; allowed: {tuple(ARCHITECTURES)}")
    return ARCHITECTURES[name]
