"""Weighted k-NN on features: cosine similarity, each neighbour votes exp(sim / T) for its class."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int, *,
                k: int, temperature: float, chunk: int = 1024) -> torch.Tensor:
    """Class scores (Q, num_classes) for each query from its ``k`` nearest bank features."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (q, N) -> (q, k)
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)
