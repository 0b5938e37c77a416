"""Penultimate features extracted once per (backbone, weights, data set, split, resolution) and cached on disk."""
from __future__ import annotations

import hashlib
import json
import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from transfer.backbones import Backbone
from transfer.weights import write_safetensors

log = logging.getLogger(__name__)
CACHE_VERSION = "1"


def cache_key(**fields) -> dict[str, str]:
    return {"cache_version": CACHE_VERSION, **{k: str(v) for k, v in sorted(fields.items())}}


def cache_path(cache_dir: Path, key: dict[str, str]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "features" / f"{key['backbone']}-{key['dataset']}-{key['split']}-{digest}.safetensors"


def _tensor_digest(feats: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256(feats.contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def read_cache(path: Path, key: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cached (features, labels), or None when absent; a damaged or mismatched file is re-extracted."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            feats, labels = f.get_tensor("features"), f.get_tensor("labels")
    except (SafetensorError, OSError, KeyError) as e:
        log.warning("feature cache %s is unreadable (%s); extracting again", path, e)
        return None
    if json.loads(meta.get("key", "{}")) != key or meta.get("sha256") != _tensor_digest(feats, labels):
        log.warning("feature cache %s does not match its key or checksum; extracting again", path)
        return None
    return feats, labels


def write_cache(path: Path, key: dict[str, str], feats: torch.Tensor, labels: torch.Tensor) -> None:
    write_safetensors({"features": feats, "labels": labels}, path,
                      metadata={"key": json.dumps(key, sort_keys=True), "sha256": _tensor_digest(feats, labels)})


@torch.inference_mode()
def extract(backbone: Backbone, dataset: Dataset, *, batch_size: int, num_workers: int, device: torch.device,
            dtype: torch.dtype | None, channels_last: bool, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled embeddings of every image: (N, num_features) float32, labels (N,) int64."""
    backbone.eval().to(device)
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    feats, labels = [], []
    for images, y in tqdm(loader, desc=desc, unit="batch", leave=False):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            feats.append(backbone(images).float().cpu())  # (B, 3, H, W) -> (B, D)
        labels.append(torch.as_tensor(y, dtype=torch.int64))
    return torch.cat(feats), torch.cat(labels)


def cached_features(backbone: Backbone, dataset: Dataset, *, key: dict[str, str], cache_dir: Path | None,
                    **extract_kwargs) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(features, labels, hit): read from the cache when present and valid, else extract and cache."""
    path = cache_path(cache_dir, key) if cache_dir else None
    if path is not None and (hit := read_cache(path, key)) is not None:
        return hit[0], hit[1], True
    feats, labels = (t.clone() for t in extract(backbone, dataset, **extract_kwargs))  # leave inference mode
    if path is not None:
        write_cache(path, key, feats, labels)
    return feats, labels, False
