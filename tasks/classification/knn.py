"""Weighted k-NN on features: cosine similarity, each neighbour votes exp(sim / T) for its class.

Bank and queries may be :class:`~tasks.classification.rows.Rows` streamed from the feature shards: for each
chunk of queries, the bank is read chunk by chunk and a running top-k (similarities and labels, (q, k)) is
merged with each bank chunk's top-k. The top-k of a union is the top-k of the parts' top-k, so the scores equal
the one-block scores (up to the order of ties). Memory: one query chunk, one bank chunk, and a
(``query_block`` x bank chunk) similarity block, whatever the bank's size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.classification.rows import Rows, as_rows

QUERY_BLOCK = 1024  # queries per similarity block: 1,024 x 65,536 float32 similarities are 256 MiB


def knn_predict(bank: torch.Tensor | Rows, bank_labels: torch.Tensor | None, queries: torch.Tensor | Rows,
                num_classes: int, *, k: int, temperature: float, chunk: int = QUERY_BLOCK) -> torch.Tensor:
    """Class scores (Q, num_classes) for each query from its ``k`` nearest bank features.

    ``bank``: (N, D) features with labels ``bank_labels`` (N,), or :class:`Rows` (``bank_labels=None``);
    ``queries``: (Q, D) or :class:`Rows`. ``chunk`` queries share one similarity block.
    """
    bank = as_rows(bank, bank_labels)
    queries = as_rows(queries)
    k = min(k, len(bank))
    scores = []
    for q_rows, _ in queries.chunks():
        q_rows = F.normalize(q_rows.float(), dim=1)
        device = q_rows.device
        best_sim = torch.full((len(q_rows), 0), float("-inf"), device=device)
        best_lab = torch.zeros((len(q_rows), 0), dtype=torch.int64, device=device)
        for b, b_labels in bank.chunks():
            b = F.normalize(b.float().to(device), dim=1)
            b_labels = b_labels.to(device)
            sims, labs = [], []
            for start in range(0, len(q_rows), chunk):
                sim, idx = (q_rows[start:start + chunk] @ b.T).topk(min(k, len(b)), dim=1)  # (q, n) -> (q, k)
                sims.append(sim)
                labs.append(b_labels[idx])
            merged_sim = torch.cat([best_sim, torch.cat(sims)], dim=1)
            merged_lab = torch.cat([best_lab, torch.cat(labs)], dim=1)
            best_sim, order = merged_sim.topk(min(k, merged_sim.shape[1]), dim=1)
            best_lab = merged_lab.gather(1, order)
        votes = torch.zeros(len(q_rows), num_classes, device=device)
        votes.scatter_add_(1, best_lab, (best_sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)
