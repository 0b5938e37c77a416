"""The one DataLoader factory (transfer.loaders.build_loader): its train/eval, worker, pinning and shard rules."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

from transfer.images import PaddedToRanks
from transfer.loaders import build_loader

DATA = list(range(10))


def test_a_training_loader_shuffles_and_drops_only_a_partial_last_batch():
    loader = build_loader(DATA, batch_size=4, num_workers=0, train=True)
    assert isinstance(loader.sampler, RandomSampler) and loader.drop_last
    assert len(loader) == 2
    small = build_loader(DATA[:3], batch_size=4, num_workers=0, train=True)  # smaller than a batch: still trains
    assert not small.drop_last and len(small) == 1


def test_an_eval_loader_keeps_order_and_every_item():
    loader = build_loader(DATA, batch_size=4, num_workers=0, train=False)
    assert isinstance(loader.sampler, SequentialSampler) and not loader.drop_last
    assert [int(x) for b in loader for x in b] == DATA


def test_workers_persist_only_for_a_loader_read_every_epoch():
    assert build_loader(DATA, batch_size=2, num_workers=2, train=True).persistent_workers
    assert not build_loader(DATA, batch_size=2, num_workers=2, train=False).persistent_workers
    assert build_loader(DATA, batch_size=2, num_workers=2, train=False, every_epoch=True).persistent_workers
    assert not build_loader(DATA, batch_size=2, num_workers=0, train=True).persistent_workers


def test_memory_is_pinned_only_for_a_cuda_device():
    assert not build_loader(DATA, batch_size=2, num_workers=0, train=False, device="cpu").pin_memory
    assert build_loader(DATA, batch_size=2, num_workers=0, train=False, device="cuda").pin_memory
    assert build_loader(DATA, batch_size=2, num_workers=0, train=False).pin_memory == torch.cuda.is_available()


def test_an_eval_shard_of_a_padded_set_repeats_no_item():
    padded = PaddedToRanks(list(range(7)), 3)  # 9 items: 7 real, 2 placeholders
    seen = []
    for rank in range(3):
        loader = build_loader(padded, batch_size=None, num_workers=0, train=False, shard=(rank, 3))
        assert isinstance(loader.sampler, DistributedSampler)
        seen += list(loader.sampler)
    assert sorted(seen) == list(range(9))


def test_a_shard_of_an_unpadded_set_or_of_training_data_is_refused():
    with pytest.raises(ValueError, match="not padded to a multiple of 3"):
        build_loader(list(range(7)), batch_size=2, num_workers=0, train=False, shard=(0, 3))
    with pytest.raises(ValueError, match="evaluation loaders"):
        build_loader(list(range(9)), batch_size=2, num_workers=0, train=True, shard=(0, 3))
    assert build_loader(DATA, batch_size=2, num_workers=0, train=False, shard=(0, 1)).sampler.__class__ is \
        SequentialSampler
