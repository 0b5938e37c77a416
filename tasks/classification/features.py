"""Penultimate features of a split, extracted once and cached on disk, in shards, under a key that covers
everything that determines them and their labels.

The key (:func:`cache_key`, built by the classification task) holds the backbone and its weights' sha256,
the data's identity (file names, sizes and mtimes, or ``datasets`` fingerprints), the split's items in
order, a digest of their labels, the label column, the class names in order, the transform, resolution,
preprocessing, autocast precision and the shard size. A split's cache is a folder of safetensors shards,
``shard-<i>-of-<n>.safetensors``, each holding the features of ``shard_images`` consecutive items of the split
(``features`` (n, D) float32, ``labels`` (n,), ``kept`` (n,): each row's position in the split), the key plus
the shard's index and item range, the sha256 of its tensors and the names of its undecodable images. Each
shard is written atomically when its last batch is done, so a killed extraction keeps every finished shard
and the same command extracts only the others. Labels read from a shard are compared with the current
split's labels; a shard that is damaged, mismatched or non-finite is extracted again (the log says why).

Extraction runs through the shared Lightning engine (:func:`extract_split`, ``trainer.predict``): under DDP
every process extracts whole shards of its own (shard ``i`` of the missing ones goes to rank ``i % world``),
so no image is padded, repeated or left out, and the features do not depend on the number of processes.
"""
from __future__ import annotations

import hashlib
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from tasks.classification.rows import CHUNK_ROWS, Part, Rows
from transfer.backbones import Backbone
from transfer.errors import TransferError
from transfer.image_sources import item_ids
from transfer.images import collate_images, unpack
from transfer.io import remove_orphan_temporaries
from transfer.loaders import build_loader
from transfer.weights import write_safetensors

log = logging.getLogger(__name__)
CACHE_VERSION = "3"  # 3: a folder of shards per split
# Images per shard by default: 8,192 x 2,048 float32 features are 64 MiB, a few minutes of one GPU's work.
SHARD_IMAGES = 8192


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
    """The folder of a split's shards: ``<cache_dir>/features/<backbone>-<dataset>-<split>-<key hash>``."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "features" / f"{key['backbone']}-{key['dataset']}-{key['split']}-{name}"


def shard_ranges(n: int, shard_images: int) -> list[tuple[int, int]]:
    """``[start, stop)`` item ranges of the shards of an ``n``-item split: consecutive, ``shard_images`` each."""
    return [(start, min(n, start + shard_images)) for start in range(0, n, shard_images)]


def shard_file(directory: Path, index: int, count: int) -> Path:
    return Path(directory) / f"shard-{index:05d}-of-{count:05d}.safetensors"


def shard_key(key: dict[str, str], index: int, start: int, stop: int) -> dict[str, str]:
    """The key a shard file carries: its split's key, its index and its item range."""
    return {**key, "shard": str(index), "items": f"{start}:{stop}"}


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
    loader = build_loader(_Positions(dataset), batch_size=batch_size, num_workers=num_workers, train=False,
                          device=device, collate_fn=collate_images)
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


def missing_shards(directory: Path, key: dict[str, str], ranges: list[tuple[int, int]],
                   expected_labels: np.ndarray) -> list[int]:
    """Indices of the shards of ``ranges`` that must be extracted: absent, or failing a full check (readable,
    key, sha256, labels, rows inside the shard's range, finite). One shard is in memory at a time."""
    missing = []
    for index, (start, stop) in enumerate(ranges):
        path = shard_file(directory, index, len(ranges))
        hit = read_cache(path, shard_key(key, index, start, stop), expected_labels)
        if hit is not None and len(hit.kept) and (int(hit.kept.min()) < start or int(hit.kept.max()) >= stop):
            log.warning("feature shard %s holds rows outside its items %d:%d; extracting again", path, start, stop)
            hit = None
        if hit is None:
            missing.append(index)
    return missing


@dataclass
class ShardedFeatures:
    """A split's features as shard files: labels and positions in memory, features read on demand.

    ``labels`` and ``kept`` (N,) int64 cover every row, shard after shard; ``sizes`` are the rows of each shard.
    ``reused`` of the ``len(paths)`` shards were read from the cache, the others extracted by this run.
    """

    paths: list[Path]
    sizes: list[int]
    labels: torch.Tensor  # (N,) int64
    kept: torch.Tensor  # (N,) int64, position of each row in the split
    dim: int
    undecodable: list[str] = field(default_factory=list)
    reused: int = 0

    @property
    def cache_hit(self) -> bool:
        return self.reused == len(self.paths)

    def rows(self, *, device: torch.device, chunk_rows: int = CHUNK_ROWS) -> Rows:
        """The features as :class:`Rows` on ``device``, read from the shards ``chunk_rows`` rows at a time."""
        parts = [Part(n, path=p) for p, n in zip(self.paths, self.sizes) if n]
        return Rows(parts, self.labels.to(device), self.dim, chunk_rows, device)

    def load(self) -> SplitFeatures:
        """Every row in memory: (N, D) float32; for small splits and tests."""
        rows = self.rows(device=torch.device("cpu"), chunk_rows=max(1, max(self.sizes, default=1)))
        return SplitFeatures(rows.materialise(), self.labels, self.kept, list(self.undecodable), self.cache_hit)


def read_shards(directory: Path, key: dict[str, str], ranges: list[tuple[int, int]], *, dim: int,
                reused: int = 0) -> ShardedFeatures:
    """The index of a split's shards (labels, positions, undecodable names; no features are read).

    Every shard must be present with its key: the extraction before this has written the missing ones.
    """
    paths, sizes, labels, kept, undecodable = [], [], [], [], []
    for index, (start, stop) in enumerate(ranges):
        path = shard_file(directory, index, len(ranges))
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                shard_labels, shard_kept = f.get_tensor("labels"), f.get_tensor("kept")
                rows, width = f.get_slice("features").get_shape()
        except (SafetensorError, OSError) as e:
            raise TransferError(f"feature shard {str(path)!r} cannot be read after extraction ({e}); is "
                                "run.cache_dir on a file system every process (every node) shares?") from None
        if json.loads(meta.get("key", "{}")) != shard_key(key, index, start, stop) or rows != len(shard_kept):
            raise TransferError(f"feature shard {str(path)!r} does not hold items {start}:{stop} of this split; "
                                "another run may be writing the same cache: rerun to extract it again.")
        if rows:
            dim = width
        paths.append(path)
        sizes.append(rows)
        labels.append(shard_labels)
        kept.append(shard_kept)
        undecodable.extend(json.loads(meta.get("undecodable", "[]")))
    cat = (lambda ts: torch.cat(ts) if ts else torch.zeros(0, dtype=torch.int64))
    return ShardedFeatures(paths, sizes, cat(labels), cat(kept), dim, undecodable, reused)


class _Batches(Dataset):
    """Item ``j`` is the whole collated batch ``batches[j]`` (positions of ``dataset``): batches never cross a
    shard, whatever loader worker builds them."""

    def __init__(self, dataset: Dataset, batches: list[list[int]]):
        self.items, self.batches = _Positions(dataset), batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int):
        return collate_images([self.items[i] for i in self.batches[j]])


def _identity(batch):
    return batch


class ShardExtraction(L.LightningModule):
    """``trainer.predict`` of the missing shards of one split.

    ``setup``: global rank 0 checks the shards already in ``directory`` and broadcasts which are missing;
    rank ``r`` of ``W`` takes missing shards ``r, r + W, ...``. Each process writes a shard (atomically)
    when its last batch is done. ``reused`` is the number of shards that checked out.
    """

    def __init__(self, backbone: Backbone, dataset: Dataset, *, directory: Path, key: dict[str, str],
                 ranges: list[tuple[int, int]], expected_labels: np.ndarray, batch_size: int, num_workers: int,
                 channels_last: bool, desc: str):
        super().__init__()
        self.backbone = backbone
        self.dataset, self.directory, self.key, self.ranges = dataset, Path(directory), key, ranges
        self.expected_labels, self.batch_size, self.num_workers = expected_labels, batch_size, num_workers
        self.use_channels_last, self.desc = channels_last, desc
        self.allow_zero_length_dataloader_with_multiple_devices = True  # more processes than missing shards
        self.reused = 0
        self._plan: list[tuple[int, list[int], bool]] = []  # (shard, positions, last batch of the shard)
        self._buffer: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []

    def setup(self, stage: str) -> None:
        missing = None
        if self.trainer.is_global_zero:
            remove_orphan_temporaries(self.directory, any_host=False)  # a killed writer's half shard
            missing = missing_shards(self.directory, self.key, self.ranges, self.expected_labels)
        missing = self.trainer.strategy.broadcast(missing, src=0)
        self.reused = len(self.ranges) - len(missing)
        mine = missing[self.global_rank::self.trainer.world_size]
        self._plan = []
        for shard in mine:
            start, stop = self.ranges[shard]
            for b in range(start, stop, self.batch_size):
                self._plan.append((shard, list(range(b, min(stop, b + self.batch_size))), b + self.batch_size >= stop))
        if self.trainer.is_global_zero and missing:
            log.info("%s: %d of %d shards to extract (%d reused) over %d process(es)", self.desc, len(missing),
                     len(self.ranges), self.reused, self.trainer.world_size)

    def predict_dataloader(self) -> DataLoader:
        return build_loader(_Batches(self.dataset, [p[1] for p in self._plan]), batch_size=None, train=False,
                            num_workers=self.num_workers, collate_fn=_identity,
                            device=self.trainer.strategy.root_device)

    def predict_step(self, batch, batch_idx: int) -> None:
        images, tags, undecodable = unpack(batch)  # tags (B, 2): label, position
        if len(images):
            if self.use_channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            feats = self.backbone(images).float().cpu()  # (B, 3, H, W) -> (B, D)
        else:
            feats = torch.zeros(0, self.backbone.num_features)
        self._buffer.append((feats, tags.cpu(), list(undecodable)))
        shard, _, last = self._plan[batch_idx]
        if last:
            self._write(shard)

    def _write(self, shard: int) -> None:
        feats, tags, bad = zip(*self._buffer)
        self._buffer = []
        tags = torch.cat(tags).reshape(-1, 2)
        split = SplitFeatures(torch.cat(feats), tags[:, 0].contiguous(), tags[:, 1].contiguous(),
                              [n for names in bad for n in names])
        check_finite(split, self.dataset, self.desc)
        start, stop = self.ranges[shard]
        write_cache(shard_file(self.directory, shard, len(self.ranges)), shard_key(self.key, shard, start, stop), split)


def extract_split(trainer: L.Trainer, backbone: Backbone, dataset: Dataset, *, directory: Path,
                  key: dict[str, str], expected_labels: np.ndarray, shard_images: int = SHARD_IMAGES,
                  batch_size: int, num_workers: int, channels_last: bool, desc: str) -> ShardedFeatures:
    """Features of every image of ``dataset`` that decodes, as shards in ``directory`` (every process of
    ``trainer`` returns the same :class:`ShardedFeatures`).

    Shards already there that pass every check are reused; the others are extracted by the processes of
    ``trainer`` (``trainer.predict``: accelerator, devices, nodes and precision of ``trainer.*``), each process
    its own whole shards. All processes wait for each other before the shards are read back.
    Raises :class:`TransferError` for non-finite features (nothing of that shard is written).
    """
    ranges = shard_ranges(len(dataset), shard_images)
    module = ShardExtraction(backbone, dataset, directory=directory, key=key, ranges=ranges,
                             expected_labels=expected_labels, batch_size=batch_size, num_workers=num_workers,
                             channels_last=channels_last, desc=desc)
    trainer.predict(module, return_predictions=False)
    trainer.strategy.barrier("feature shards")
    return read_shards(directory, key, ranges, dim=backbone.num_features, reused=module.reused)
