"""The NaN/Inf check of every loaded weights file: element-wise test vs the finite-sum test, side by side.

    python bench/bench_weights.py [--backbone rs50] [--repeats 5]

Builds the entry's state dict (random weights, with its classifier) and times, alternately in one process, the
element-wise check (``torch.isfinite(v).all()`` per tensor, what ``transfer.weights.non_finite`` ran before) and
``transfer.weights.non_finite`` (a finite sum proves a tensor finite; the element-wise test runs only when it is
not), on the clean state dict and on one holding a NaN; both must name the same tensors. Prints the best of
``--repeats`` for each and their ratio; figures describe this machine at this moment, never pass/fail.
"""
from __future__ import annotations

import argparse
import time

import timm
import torch

from transfer.backbones import BACKBONES
from transfer.weights import non_finite


def elementwise(sd: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def best(fn, sd, repeats: int) -> tuple[float, list[str]]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(sd)
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="rs50")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    spec = BACKBONES.get(args.backbone)
    torch.manual_seed(0)
    clean = timm.create_model(spec.arch, pretrained=False, **spec.arch_kwargs).state_dict()
    broken = dict(clean)
    key = next(k for k, v in clean.items() if v.is_floating_point() and v.numel() > 1000)
    broken[key] = clean[key].clone()
    broken[key].view(-1)[7] = float("nan")
    n = sum(v.numel() for v in clean.values())
    print(f"{args.backbone}: {len(clean)} tensors, {n / 1e6:.1f} M values; best of {args.repeats}, "
          f"torch threads {torch.get_num_threads()}")
    for label, sd in (("clean", clean), ("one NaN", broken)):
        old_s = new_s = float("inf")
        for _ in range(2):  # alternate, so a change of machine load hits both
            t, old = best(elementwise, sd, args.repeats)
            old_s = min(old_s, t)
            t, new = best(non_finite, sd, args.repeats)
            new_s = min(new_s, t)
        assert old == new, (old, new)
        print(f"  {label:8s} element-wise {1000 * old_s:8.1f} ms   finite-sum first {1000 * new_s:8.1f} ms   "
              f"ratio {old_s / new_s:5.1f}x   (names {new})")


if __name__ == "__main__":
    main()
