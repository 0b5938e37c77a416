"""Converters from official checkpoint release formats to the registry's layout (timm keys).

Each converter module registers ``name -> ConverterSpec``; ``python -m transfer.convert NAME SRC DST``
runs one and writes ``DST`` as safetensors.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from transfer.registry import Registry


@dataclass(frozen=True)
class ConverterSpec:
    """``convert(src)`` reads an official file or folder and returns a state dict in timm's layout."""

    convert: Callable[[Path], dict[str, torch.Tensor]]
    description: str
    backbones: tuple[str, ...] = ()  # registry entries whose weights this converter produces


CONVERTERS: Registry[ConverterSpec] = Registry("converter")
