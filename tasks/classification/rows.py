"""Feature rows read in bounded chunks: in memory, or streamed from the safetensors shards of the feature cache.

:class:`Rows` is what the linear probe and k-NN consume. It is a list of *parts* (a tensor held in memory, or
one shard file of the cache) and yields ``(features, labels)`` chunks of at most ``chunk_rows`` rows on the
fitting device. A shard part is read row range by row range (``safe_open(...).get_slice``), so a chunk never
needs more than ``chunk_rows x D x 4`` bytes of host memory, whatever the number of rows or the shard size.
:meth:`Rows.resident` loads the rows onto the device once when they fit a byte budget (then every later pass
is a view of device memory); above it every pass reads the shards again.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

# Rows per chunk by default: 65,536 x 2,048 float32 features are 512 MiB.
CHUNK_ROWS = 65_536


@dataclass
class Part:
    """Rows ``[0, length)`` of one source: an in-memory (n, D) tensor, or the ``features`` of a shard file."""

    length: int
    tensor: torch.Tensor | None = None
    path: Path | None = None

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as float32 (stop - start, D); a shard file is read for that range only."""
        if self.tensor is not None:
            return self.tensor[start:stop]
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_slice("features")[start:stop].float()


@dataclass
class Rows:
    """``N`` feature rows of dimension ``dim`` with their labels (N,) int64, read in chunks.

    ``chunk_rows`` bounds every chunk; ``device`` is where chunks are delivered. ``transform`` (optional)
    maps each chunk on the device (e.g. to principal-axis coordinates), row by row.
    """

    parts: list[Part]
    labels: torch.Tensor  # (N,) int64, on ``device``
    dim: int
    chunk_rows: int = CHUNK_ROWS
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def from_tensors(cls, x: torch.Tensor, y: torch.Tensor, chunk_rows: int | None = None) -> Rows:
        """Rows of an in-memory (N, D) tensor with labels (N,); one chunk unless ``chunk_rows`` is given."""
        return cls([Part(len(x), tensor=x)], y, x.shape[1], chunk_rows or max(1, len(x)), x.device)

    def __len__(self) -> int:
        return sum(p.length for p in self.parts)

    @property
    def dtype(self) -> torch.dtype:
        return next((p.tensor.dtype for p in self.parts if p.tensor is not None), torch.float32)

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` chunks in row order: x (n, dim) on ``device`` (after ``transform``), y (n,), n <= chunk_rows.

        A chunk never spans two parts, so the chunks of the same rows differ with the parts only in where
        they are cut, never in what a row holds.
        """
        offset = 0
        for part in self.parts:
            for start in range(0, part.length, self.chunk_rows):
                stop = min(part.length, start + self.chunk_rows)
                x = part.read(start, stop).to(self.device, non_blocking=True)
                if self.transform is not None:
                    x = self.transform(x)
                yield x, self.labels[offset + start:offset + stop]
            offset += part.length

    def map(self, transform: Callable[[torch.Tensor], torch.Tensor], dim: int) -> Rows:
        """The same rows with ``transform`` applied to every chunk (rows of dimension ``dim``)."""
        base = self.transform
        fn = transform if base is None else (lambda x: transform(base(x)))
        return Rows(self.parts, self.labels, dim, self.chunk_rows, self.device, fn)

    def nbytes(self) -> int:
        return len(self) * self.dim * torch.finfo(self.dtype).bits // 8

    def materialise(self) -> torch.Tensor:
        """All rows as one (N, dim) tensor on ``device``; for small sets, or within a budget."""
        chunks = [x for x, _ in self.chunks()]
        return torch.cat(chunks) if chunks else torch.zeros(0, self.dim, device=self.device)

    def resident(self, max_bytes: float) -> Rows:
        """These rows held in ``device`` memory when they take at most ``max_bytes``; else themselves (streamed)."""
        if len(self.parts) == 1 and self.parts[0].tensor is not None and self.transform is None:
            return self
        if self.nbytes() > max_bytes:
            return self
        x = self.materialise()
        return Rows([Part(len(x), tensor=x)], self.labels, self.dim, self.chunk_rows, self.device)

    @property
    def in_memory(self) -> bool:
        return all(p.tensor is not None for p in self.parts)


def concat(*sets: Rows) -> Rows:
    """The rows of ``sets`` one after the other (train + val); the chunking and device of the first."""
    first = sets[0]
    if any(s.transform is not None for s in sets):
        raise ValueError("concat of transformed rows: concatenate the sources, then map")
    return Rows([p for s in sets for p in s.parts], torch.cat([s.labels for s in sets]), first.dim,
                first.chunk_rows, first.device)


def as_rows(x: torch.Tensor | Rows, y: torch.Tensor | None = None) -> Rows:
    """``x`` itself when it is :class:`Rows`, else the in-memory rows of ``x`` (N, D) with labels ``y`` (N,)."""
    if isinstance(x, Rows):
        return x
    if y is None:  # features only (a principal basis): no labels are read
        y = torch.zeros(len(x), dtype=torch.int64, device=x.device)
    return Rows.from_tensors(x, y)
