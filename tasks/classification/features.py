"""Penultimate features of a split, extracted once and cached on disk under a key that covers everything
that determines them and their labels.

The key (:func:`cache_key`, built by the classification task) holds the backbone and its weights' sha256,
the data's identity (file names, sizes and mtimes, or ``datasets`` fingerprints), the split's items in
order, a digest of their labels, the label column, the class names in order, the transform, resolution,
preprocessing and autocast precision. Labels read from a cache file are also compared with the current
split's labels before use; any mismatch re-extracts and logs why. A cached file is checked against its
sha256, and non-finite features are refused, read or freshly extracted.
"""
from __future__ import annotations

import hashlib
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from tasks.classification.sources import item_ids
from transfer.backbones import Backbone
from transfer.errors import TransferError
from transfer.images import collate_images, unpack
from transfer.weights import write_safetensors

log = logging.getLogger(__name__)
CACHE_VERSION = "2"


@dataclass
class SplitFeatures:
    """Features of one split: a row per image that decoded (``kept`` gives its position in the split)."""

    features: torch.Tensor  # (N, D) float32
    labels: torch.Tensor  # (N,) int64
    kept: torch.Tensor  # (N,) int64, position of each row in the split
    undecodable: list[str] = field(default_factory=list)  # names of the images that failed to decode
    cache_hit: bool = False


def digest(values) -> str:
    """sha256 of an array's bytes or of a JSON-able value: short, stable cache-key fields."""
    if isinstance(values, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def cache_key(**fields) -> dict[str, str]:
    return {"cache_version": CACHE_VERSION, **{k: str(v) for k, v in sorted(fields.items())}}


def cache_path(cache_dir: Path, key: dict[str, str]) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "features" / f"{key['backbone']}-{key['dataset']}-{key['split']}-{name}.safetensors"


def _tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def read_cache(path: Path, key: dict[str, str], expected_labels: np.ndarray) -> SplitFeatures | None:
    """Cached features, or None when absent; a damaged, mismatched or non-finite file is re-extracted.

    ``expected_labels`` (N,): the current split's labels. The cached labels must equal them at the cached
    positions, whatever the key says.
    """
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            feats, labels, kept = (f.get_tensor(k) for k in ("features", "labels", "kept"))
        undecodable = json.loads(meta.get("undecodable", "[]"))
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        log.warning("feature cache %s is unreadable (%s); extracting again", path, e)
        return None
    if json.loads(meta.get("key", "{}")) != key or meta.get("sha256") != _tensor_digest(feats, labels, kept):
        log.warning("feature cache %s does not match its key or checksum; extracting again", path)
        return None
    why = _label_mismatch(labels, kept, expected_labels)
    if why:
        log.warning("feature cache %s: %s; extracting again", path, why)
        return None
    if not torch.isfinite(feats).all():
        log.warning("feature cache %s holds non-finite features; extracting again", path)
        return None
    return SplitFeatures(feats, labels, kept, undecodable, cache_hit=True)


def _label_mismatch(labels: torch.Tensor, kept: torch.Tensor, expected: np.ndarray) -> str:
    """Why cached labels cannot be used for the split whose labels are ``expected``; "" when they can."""
    if len(labels) != len(kept):
        return f"{len(labels)} labels for {len(kept)} rows"
    if len(kept) and (int(kept.min()) < 0 or int(kept.max()) >= len(expected)):
        return f"rows point outside the split's {len(expected)} images"
    if len(kept) > 1 and not bool((kept[1:] > kept[:-1]).all()):
        return "row positions are not increasing"
    differ = int((labels.numpy() != expected[kept.numpy()]).sum())
    if differ:
        return f"{differ} of {len(labels)} cached labels differ from the split's current labels"
    return ""


def write_cache(path: Path, key: dict[str, str], split: SplitFeatures) -> None:
    tensors = {"features": split.features, "labels": split.labels, "kept": split.kept}
    write_safetensors(tensors, path, metadata={
        "key": json.dumps(key, sort_keys=True), "sha256": _tensor_digest(split.features, split.labels, split.kept),
        "undecodable": json.dumps(split.undecodable)})


class _Positions(Dataset):
    """``(image, (label, position))``: the position survives the collate that drops undecodable images."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return image, torch.tensor([label, i])


@torch.inference_mode()
def extract(backbone: Backbone, dataset: Dataset, *, batch_size: int, num_workers: int, device: torch.device,
            dtype: torch.dtype | None, channels_last: bool, desc: str) -> SplitFeatures:
    """Pooled embeddings of every image of ``dataset`` that decodes: (N, num_features) float32.

    Images that fail to decode are left out and named in ``undecodable`` (counted here, in the process
    that iterates the loader, since loader workers cannot update its counters).
    """
    backbone.eval().to(device)
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    loader = DataLoader(_Positions(dataset), batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        pin_memory=device.type == "cuda", persistent_workers=False, collate_fn=collate_images)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    feats, tags, bad = [], [], []
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        images, tag, undecodable = unpack(batch)
        bad.extend(undecodable)
        if not len(images):
            continue
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            feats.append(backbone(images).float().cpu())  # (B, 3, H, W) -> (B, D)
        tags.append(tag)
    tags = torch.cat(tags) if tags else torch.zeros(0, 2, dtype=torch.int64)  # (N, 2): label, position
    features = torch.cat(feats) if feats else torch.zeros(0, backbone.num_features)
    return SplitFeatures(features, tags[:, 0].contiguous(), tags[:, 1].contiguous(), bad)


def check_finite(split: SplitFeatures, dataset: Dataset, desc: str) -> None:
    """Refuse features with NaN or Inf: a linear probe or k-NN on them would score garbage or fail deep inside."""
    bad_rows = (~torch.isfinite(split.features)).any(1)
    if bad_rows.any():
        ids = item_ids(dataset)
        examples = [str(ids[int(split.kept[i])]) for i in torch.nonzero(bad_rows).flatten()[:3]]
        raise TransferError(
            f"{desc}: the backbone gave non-finite (NaN/Inf) features for {int(bad_rows.sum())} of "
            f"{len(bad_rows)} images, e.g. {examples}. Under trainer.precision=16-mixed or bf16-mixed this "
            "can be an overflow: try trainer.precision=32-true; with 32-true the weights themselves are suspect.")


def cached_features(backbone: Backbone, dataset: Dataset, *, key: dict[str, str], cache_dir: Path | None,
                    expected_labels: np.ndarray, **extract_kwargs) -> SplitFeatures:
    """Features of ``dataset`` read from the cache when present and valid for ``expected_labels``, else
    extracted (and cached when ``cache_dir`` is given)."""
    path = cache_path(cache_dir, key) if cache_dir else None
    if path is not None and (hit := read_cache(path, key, expected_labels)) is not None:
        return hit
    split = extract(backbone, dataset, **extract_kwargs)
    split.features, split.labels, split.kept = (t.clone() for t in (split.features, split.labels, split.kept))
    check_finite(split, dataset, extract_kwargs.get("desc", "features"))
    if path is not None:
        write_cache(path, key, split)
    return split
