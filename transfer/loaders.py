"""The one ``DataLoader`` factory: every adapter's training, evaluation and feature loaders are built here.

The rules it applies, so that no adapter re-decides them:

- **train vs eval**: a training loader shuffles and drops its last incomplete batch when the data set holds
  more than one batch (a set smaller than one batch still trains, as one short batch); an evaluation loader
  keeps its order and every item.
- **workers**: ``num_workers`` worker processes (``trainer.num_workers``); they persist between epochs only for a
  loader iterated every epoch (training, and validation during a fit), where restarting them would cost a
  fork and a re-open of every file each epoch; a loader read once does not hold them. ``prefetch_factor`` is
  torch's (2 batches per worker).
- **pinned memory**: only when the batches go to a CUDA device (``device``; by default: when CUDA is available).
- **reproducibility**: nothing here draws random numbers. A training loader built here is a plain
  ``DataLoader`` over a map-style set, which :class:`transfer.reproducible.ReproducibleEpochs` (added by
  :func:`transfer.engine.build_trainer`) rebuilds so that its shuffle and augmentation are a function of
  (``trainer.seed``, epoch); Lightning seeds the workers (``seed_everything(workers=True)``, done once by
  ``transfer.run``).
- **DDP evaluation**: ``shard=(rank, ranks)`` gives an explicit ``DistributedSampler`` over a set the caller has
  already padded to a multiple of ``ranks`` (:class:`transfer.images.PaddedToRanks`, or a task's own padding),
  so the sampler repeats no item: a test item scored twice would be a wrong number. Without ``shard``
  Lightning adds its own sampler, which repeats nothing on a padded set either.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def build_loader(data: Dataset, *, batch_size: int | None, num_workers: int, train: bool,
                 collate_fn: Callable[[list], Any] | None = None, every_epoch: bool | None = None,
                 device: torch.device | str | None = None, shard: tuple[int, int] | None = None) -> DataLoader:
    """A ``DataLoader`` over ``data`` by the rules of the module docstring.

    ``batch_size=None`` passes items through unbatched (a data set whose items are whole batches).
    ``every_epoch`` (default: ``train``) says whether the loader is iterated each epoch (persistent workers).
    ``shard=(rank, ranks)`` is for evaluation only, over a set padded to a multiple of ``ranks``.

    Raises ``ValueError`` for a shard of a training loader or of a set that is not padded (a programming error:
    the padding is the caller's).
    """
    sampler = None
    if shard is not None and shard[1] > 1:
        rank, ranks = shard
        if train:
            raise ValueError("shard= is for evaluation loaders; Lightning shards a training loader itself")
        if len(data) % ranks:
            raise ValueError(f"an evaluation set of {len(data)} items is not padded to a multiple of {ranks} ranks: "
                             "DistributedSampler would repeat real items")
        sampler = DistributedSampler(data, num_replicas=ranks, rank=rank, shuffle=False, drop_last=False)
    if every_epoch is None:
        every_epoch = train
    if device is None:
        pin = torch.cuda.is_available()
    else:
        pin = torch.device(device).type == "cuda"
    return DataLoader(data, batch_size=batch_size, shuffle=train if sampler is None else False,
                      drop_last=train and batch_size is not None and len(data) > batch_size, sampler=sampler,
                      num_workers=num_workers, persistent_workers=every_epoch and num_workers > 0,
                      pin_memory=pin, collate_fn=collate_fn)
