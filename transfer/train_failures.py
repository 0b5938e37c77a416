"""Training inputs that failed to decode, counted over epochs, DDP ranks and a resume.

A task whose training loader skips inputs that do not decode (video clips, depth frames) holds one
:class:`TrainFailures` in its LightningModule: each batch reports the dataset indices that failed, every epoch
end sums the counts over ranks and calls the task's check (which raises above ``task.max_bad_fraction``), and the
counts travel in the checkpoint so that a resumed run keeps counting from them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

Sum = Callable[[torch.Tensor], torch.Tensor]  # a sum over DDP ranks (the strategy's reduce); identity alone


class TrainFailures:
    """Per-item failure flags and read-failure counts of the training set.

    ``items``: the training set's length. ``skipped_key`` counts failed reads (an item fails once per epoch it is
    drawn), ``failed_key`` the distinct items that failed; both become ``totals`` (results.json counts) after
    each :meth:`reduce`. ``check(failed_indices)`` is the task's limit (raises :class:`transfer.errors.DataError`).
    """

    def __init__(self, items: int, *, skipped_key: str, failed_key: str, check: Callable[[list[int]], None]):
        self.failed = torch.zeros(items, dtype=torch.bool)  # this rank's, over all epochs
        self.skipped = 0  # this rank's failed reads
        self.skipped_key, self.failed_key, self.check = skipped_key, failed_key, check
        self.totals = {skipped_key: 0, failed_key: 0}
        self.so_far: list[int] = []  # every rank's failed items as of the last epoch end

    def add(self, failed: torch.Tensor) -> None:
        """``failed`` (F,) long: the dataset indices of the items of one batch that did not decode."""
        self.failed[failed.cpu()] = True
        self.skipped += len(failed)

    def reduce(self, sum_ranks: Sum) -> list[int]:
        """The failed items of every rank; sets :attr:`totals`."""
        failed = (sum_ranks(self.failed.to(torch.int32)) > 0).nonzero().flatten().tolist()
        self.totals = {self.skipped_key: int(sum_ranks(torch.tensor(self.skipped))), self.failed_key: len(failed)}
        return failed

    def epoch_end(self, sum_ranks: Sum) -> None:
        """Reduce and check (after every training epoch)."""
        self.so_far = self.reduce(sum_ranks)
        self.check(self.so_far)

    def train_end(self, sum_ranks: Sum) -> None:
        """Reduce and check once more at the end of training (a run stopped by max_steps mid-epoch)."""
        self.check(self.reduce(sum_ranks))

    def state(self) -> dict:
        """For the checkpoint: every rank's counts as of the last epoch end."""
        return {"train_failed": self.so_far, self.skipped_key.split("/")[-1]: self.totals[self.skipped_key]}

    def load(self, saved: dict, *, global_rank: int) -> None:
        """Continue from :meth:`state`: the failed items on every rank (a union), the read count on rank 0 (a sum)."""
        self.failed[saved["train_failed"]] = True
        if global_rank == 0:
            self.skipped = int(saved[self.skipped_key.split("/")[-1]])


class CountsTrainFailures:
    """LightningModule mixin for a module holding :attr:`failures` (a :class:`TrainFailures`): reduces and checks
    them after every training epoch and at the end of training, and keeps them in the checkpoint under
    :attr:`failures_checkpoint_key`. List it before ``L.LightningModule``; a module that needs more in one of
    these hooks calls ``super()``.
    """

    failures: TrainFailures
    failures_checkpoint_key: str

    def sum_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the DDP ranks (``t`` itself in one process)."""
        return self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum")

    @property
    def totals(self) -> dict[str, int]:
        """The failure counts over every rank as of the last reduce (results.json counts)."""
        return self.failures.totals

    def on_train_epoch_end(self) -> None:
        self.failures.epoch_end(self.sum_ranks)

    def on_train_end(self) -> None:
        self.failures.train_end(self.sum_ranks)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[self.failures_checkpoint_key] = self.failures.state()  # a resumed run keeps counting from them

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if saved := checkpoint.get(self.failures_checkpoint_key):
            trainer = getattr(self, "_trainer", None)
            self.failures.load(saved, global_rank=0 if trainer is None else trainer.global_rank)
