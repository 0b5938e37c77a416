"""Training epochs that are a function of (seed, epoch), so a resumed run replays the uninterrupted one.

Lightning restores the model, optimiser, scheduler, loop counters and callbacks from a checkpoint, but
not the random state, and a resumed process starts from ``seed_everything(seed)`` again: its "epoch 1"
would replay epoch 0's shuffle and augmentation draws. Instead of carrying random state over, every
epoch derives its own from the seed and the epoch number (``numpy.random.SeedSequence``), wherever the
draws happen:

- **shuffle order**: :class:`EpochSampler` permutes the training set with a generator seeded from
  (seed, epoch), the epoch read from the trainer when the loader is iterated; every rank draws the same
  order and Lightning's distributed sampler shards it;
- **augmentation**: each training sample is loaded with torch, ``random`` and numpy seeded from
  (seed, epoch, sample index), so it does not depend on which worker loads it, how many workers there
  are, or whether they persist between epochs (``trainer.num_workers`` does not change the result);
- **the training step** (dropout, drop path, mixup): torch (CPU and CUDA), ``random`` and numpy are
  reseeded from (seed, epoch, rank) when each training epoch starts.

:class:`ReproducibleEpochs` applies this to the training loader of any LightningModule or DataModule
trained by :func:`transfer.engine.build_trainer`; adapters build plain training loaders
(:func:`transfer.loaders.build_loader`). Randomness held in an adapter's own generator objects
(``numpy.random.default_rng`` stored on a dataset) is outside this scheme.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

log = logging.getLogger(__name__)

# Tags keep the streams of one (seed, epoch) apart.
_SHUFFLE, _SAMPLE, _STEP = 1, 2, 3
_MASK = (1 << 64) - 1


def derive_seeds(*entropy: int, count: int = 3) -> list[int]:
    """``count`` independent 64-bit seeds from non-negative integers (``numpy.random.SeedSequence``)."""
    state = np.random.SeedSequence([int(e) & _MASK for e in entropy]).generate_state(count, dtype=np.uint64)
    return [int(s) for s in state]


def seed_all(*entropy: int) -> None:
    """Seed torch (CPU and every CUDA device), ``random`` and numpy from ``entropy``."""
    s_torch, s_random, s_numpy = derive_seeds(*entropy)
    torch.manual_seed(s_torch)
    random.seed(s_random)
    np.random.seed(s_numpy % 2**32)


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` for every index of a data set, shuffled by (seed, epoch) when ``shuffle``.

    ``epoch_of()`` is read each time the sampler is iterated: Lightning creates the first iterator of a
    resumed process before it calls ``set_epoch``, so the epoch comes from the trainer's progress instead.
    """

    def __init__(self, size: int, *, seed: int, shuffle: bool, epoch_of: Callable[[], int]):
        self.size, self.seed, self.shuffle, self.epoch_of = size, seed, shuffle, epoch_of

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(self.epoch_of())
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seeds(self.seed, epoch, _SHUFFLE, count=1)[0] % 2**63)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = range(self.size)
        return ((epoch, i) for i in order)  # epoch and order fixed now: the iterator may be drained later


class SeededSamples(Dataset):
    """``dataset[index]`` loaded with the random generators seeded from (seed, epoch, index).

    The caller's generator states are restored afterwards, so loading on the main process
    (``num_workers=0``) leaves the training step's draws as they would be with workers.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        s_torch, s_random, s_numpy = derive_seeds(self.seed, epoch, _SAMPLE, index)
        saved = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
        # CPU generator only: augmentation runs on the CPU, and seeding CUDA per sample would be slow.
        torch.random.default_generator.manual_seed(s_torch)
        random.seed(s_random)
        np.random.seed(s_numpy % 2**32)
        try:
            return self.dataset[index]
        finally:
            torch.random.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def reproducible_loader(loader: Any, *, seed: int, epoch_of: Callable[[], int]) -> DataLoader | None:
    """The same loader with :class:`EpochSampler` and :class:`SeededSamples`, or None where that cannot be done.

    Only a plain ``DataLoader`` over a map-style data set with the default batch sampler and a random or
    sequential sampler is rebuilt; anything custom is left to its owner.
    """
    if type(loader) is not DataLoader or isinstance(loader.dataset, IterableDataset):
        return None
    if type(loader.batch_sampler) is not BatchSampler:
        return None
    sampler = loader.sampler
    if type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == len(loader.dataset):
        shuffle = True
    elif type(sampler) is SequentialSampler:
        shuffle = False
    else:
        return None
    return DataLoader(
        SeededSamples(loader.dataset, seed), batch_size=loader.batch_size,
        sampler=EpochSampler(len(loader.dataset), seed=seed, shuffle=shuffle, epoch_of=epoch_of),
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        drop_last=loader.drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        # A generator of its own: creating the iterator then draws nothing from the global torch generator.
        generator=torch.Generator(), prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers, pin_memory_device=loader.pin_memory_device,
        in_order=loader.in_order)


class ReproducibleEpochs(L.Callback):
    """Make every training epoch a function of (``seed``, epoch); see the module docstring."""

    def __init__(self, seed: int):
        self.seed = seed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.datamodule is not None and is_overridden("train_dataloader", trainer.datamodule):
            owner = trainer.datamodule
        elif is_overridden("train_dataloader", pl_module):
            owner = pl_module
        else:
            log.warning("training data passed to fit() directly: its shuffle and augmentation are not derived from "
                        "(seed, epoch), so a resumed run may differ from an uninterrupted one")
            return
        build = owner.train_dataloader
        if getattr(build, "_reproducible", False):
            return

        def epoch_of() -> int:  # Lightning's counter for the epoch about to run (what it passes to set_epoch)
            return trainer.fit_loop.epoch_progress.current.processed

        def train_dataloader():
            loader = build()
            rebuilt = reproducible_loader(loader, seed=self.seed, epoch_of=epoch_of)
            if rebuilt is None:
                log.warning("the training loader (%s) is not a plain DataLoader over a map-style data set; its "
                            "shuffle and augmentation are not derived from (seed, epoch), so a resumed run may "
                            "differ from an uninterrupted one", type(loader).__name__)
                return loader
            return rebuilt

        train_dataloader._reproducible = True
        owner.train_dataloader = train_dataloader  # this instance only; the class is untouched

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seed_all(self.seed, trainer.current_epoch, _STEP, trainer.global_rank)
