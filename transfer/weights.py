"""Reading, checking and writing backbone weights.

Every file is read without running pickled code: safetensors first, other files through
``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from transfer.errors import WeightsError
from transfer.io import atomic_path, sha256_file

STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")
WRAPPER_KEYS = ("state_dict", "model")


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from: ``random``, ``hub:<id>``, ``url:<url>`` or ``file:<path>``."""

    source: str
    path: str | None = None
    sha256: str | None = None

    def as_dict(self) -> dict:
        return {"source": self.source, "path": self.path, "sha256": self.sha256}


def is_state_dict_file(path: str | os.PathLike) -> bool:
    return str(path).endswith(STATE_DICT_SUFFIXES)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a tensor-only ``.pth``/``.bin`` file.

    A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped, as is DDP's ``module.`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist. Pass an existing "
                           f"{'/'.join(STATE_DICT_SUFFIXES)} file as backbone.weights=/path/to/file.")
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"weights file {str(path)!r} is not a readable safetensors file: {e}") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise WeightsError(
                f"refused to load {str(path)!r}: it holds pickled objects other than tensors and plain "
                f"containers, and loading it could run code ({str(e).splitlines()[0]}). Re-save only the "
                "state dict (torch.save(model.state_dict(), ...)) or convert it to .safetensors."
            ) from None
        except (RuntimeError, OSError, EOFError) as e:
            raise WeightsError(f"weights file {str(path)!r} could not be read: {e}") from None
    return unwrap_state_dict(sd, origin=str(path))


def unwrap_state_dict(obj: object, *, origin: str) -> dict[str, torch.Tensor]:
    for _ in range(2):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{origin!r} holds no state dict (expected a mapping of names to tensors, "
                           f"optionally under one of the keys {WRAPPER_KEYS}).")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(sd) != len(obj):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
        raise WeightsError(f"{origin!r}: entries that are not tensors: {bad}")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def write_safetensors(sd: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> str:
    """Write ``sd`` atomically as safetensors; return the file's sha256."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
    return sha256_file(path)


def check_finite(sd: Mapping[str, torch.Tensor], *, origin: str) -> None:
    """Weights holding NaN or inf would train or score garbage: refuse them naming the file and the tensors."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" … and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise WeightsError(f"weights from {origin!r} hold NaN or infinite values in {len(bad)} tensor(s): "
                           f"{', '.join(bad[:5])}{more}. The file is damaged or came from a diverged run; "
                           "download or convert it again.")


def load_strict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], *, origin: str,
                optional_prefixes: tuple[str, ...] = (), strict: bool = True) -> None:
    """Load ``sd`` into ``model``; missing, unexpected or mis-shaped keys are an error listing them.

    Keys under ``optional_prefixes`` (the ImageNet classifier, dropped for transfer) may be absent.
    """
    check_finite(sd, origin=origin)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(optional_prefixes)]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if strict and (missing or unexpected) or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                more = f" … and {len(keys) - 10} more" if len(keys) > 10 else ""
                parts.append(f"{label} ({len(keys)}): {', '.join(keys[:10])}{more}")
        raise WeightsError(f"weights from {origin!r} do not match the model: " + "; ".join(parts)
                           + ". Check that the file belongs to this backbone (timm key layout), or pass "
                             "backbone.strict=false to load the matching keys only.")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
