"""Training inputs that failed to decode (transfer.train_failures): counted over epochs, ranks and a resume."""
from __future__ import annotations

import pytest
import torch

from transfer.errors import DataError
from transfer.train_failures import TrainFailures


def _failures(checked: list) -> TrainFailures:
    return TrainFailures(6, skipped_key="train/skipped_clips", failed_key="train/videos_failed_decode",
                         check=checked.append)


def test_each_epoch_end_sums_ranks_and_checks_the_distinct_items():
    checked: list = []
    ranks = [_failures(checked), _failures(checked)]
    ranks[0].add(torch.tensor([1, 4]))
    ranks[1].add(torch.tensor([4]))
    ranks[1].add(torch.tensor([], dtype=torch.long))
    # a two-rank all-reduce: each rank's tensor plus the other's
    for me, other in ((0, 1), (1, 0)):
        mine, theirs = ranks[me], ranks[other]
        sums = iter([theirs.failed.to(torch.int32), torch.tensor(theirs.skipped)])
        mine.epoch_end(lambda t, sums=sums: t + next(sums))
    assert checked == [[1, 4], [1, 4]]
    assert ranks[0].totals == {"train/skipped_clips": 3, "train/videos_failed_decode": 2}


def test_the_counts_survive_a_checkpoint_and_the_read_count_is_restored_once():
    before = _failures([])
    before.add(torch.tensor([2, 2, 5]))
    before.epoch_end(lambda t: t)
    state = before.state()
    assert state == {"train_failed": [2, 5], "skipped_clips": 3}
    rank0, rank1 = _failures([]), _failures([])
    rank0.load(state, global_rank=0)
    rank1.load(state, global_rank=1)
    assert rank0.failed.nonzero().flatten().tolist() == rank1.failed.nonzero().flatten().tolist() == [2, 5]
    assert (rank0.skipped, rank1.skipped) == (3, 0)  # summed over ranks later: counted once


def test_the_task_check_stops_training_at_the_end_too():
    def check(failed):
        if len(failed) > 1:
            raise DataError(f"{len(failed)} videos failed")

    f = TrainFailures(4, skipped_key="train/skipped_frames", failed_key="train/frames_failed_decode", check=check)
    f.add(torch.tensor([0, 3]))
    with pytest.raises(DataError, match="2 videos failed"):
        f.train_end(lambda t: t)
