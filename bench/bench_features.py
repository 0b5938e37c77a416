"""Frozen-feature protocols at growing N: extraction throughput and peak host memory, shards streamed.

    python bench/bench_features.py [--sizes 1000 4000 16000] [--backbone rs50] [--resolution 32]
                                   [--batch 64] [--workers 2] [--shard-images 1024] [--chunk-rows 1024]

For each N, a fresh process writes N tiny PNG images (8 px, real on-disk format), extracts their features into
safetensors shards through the Lightning engine (``tasks.classification.features.extract_split``), then runs,
streamed from the shards (nothing held whole): the principal basis and one L-BFGS fit of the linear probe, and
k-NN of 1,000 queries (the first rows of every shard, in equal numbers) against the N-row bank. It prints
images/s of the extraction, seconds of the probe and k-NN, the size of the features on disk, and peak resident
set sizes (``ru_maxrss``): of the main process, and of the largest loader worker (``RUSAGE_CHILDREN``; the
workers end with the extraction). Host memory at the peak is at most main + workers x largest worker; with
``--workers 0`` the main process is everything.

``ru_maxrss`` counts file pages too: the shards are read through safetensors' memory map, and every page of a
shard the probe or k-NN touched stays in the resident set (page cache the kernel can drop, not memory the process
holds) until it is unmapped. So the main process is also sampled every 5 ms from ``/proc/self/status`` (Linux):
the peak of ``RssAnon`` (anonymous memory: tensors, Python objects, allocator arenas; what the bound in
docs/classification.md is about) and of ``RssFile`` (mapped file pages), each over the probe and k-NN phase
(streamed from the shards) and over the whole run. Flat anonymous peak while the features grow is the point;
figures describe this machine at this moment, never pass/fail.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATUS_FIELDS = ("RssAnon", "RssFile")


def _status_kib() -> dict[str, int]:
    """``RssAnon`` and ``RssFile`` of this process in KiB (Linux /proc/self/status); {} where there is none."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            out[key] = int(value.split()[0])
    return out


class PeakSampler:
    """Peaks of ``RssAnon`` / ``RssFile`` (KiB) sampled every ``interval`` s on a thread; ``reset()`` starts a phase."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self.phase: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for key, value in _status_kib().items():
            self.peaks[key] = max(self.peaks.get(key, 0), value)
            self.phase[key] = max(self.phase.get(key, 0), value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def start(self) -> PeakSampler:
        self._thread.start()
        return self

    def reset(self) -> None:
        """Start a new phase: ``phase`` peaks count from now (sampled once immediately)."""
        self.phase = {}
        self._sample()

    def stop(self) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()


def one_size(args: argparse.Namespace) -> dict:
    """Everything for one N, in this process (its ru_maxrss is this N's peak)."""
    import lightning as L
    import numpy as np
    import torch
    from PIL import Image

    from tasks.classification.datasets import Transformed
    from tasks.classification.features import cache_key, extract_split
    from tasks.classification.knn import knn_predict
    from tasks.classification.linear import fit_logistic
    from tasks.classification.rows import Rows
    from tasks.classification.task import eval_transform
    from transfer.backbones import build_backbone
    from transfer.image_sources import FileImages

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampler = PeakSampler().start()
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        paths, labels = [], []
        for i in range(args.n):
            path = Path(tmp) / "images" / f"{i:06d}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
            paths.append(str(path))
            labels.append(i % 10)
        backbone = build_backbone(args.backbone, weights="random")
        data = Transformed(FileImages(paths, labels), eval_transform(backbone, args.resolution))
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            use_distributed_sampler=False, default_root_dir=tmp, precision="32-true")
        start = time.perf_counter()
        feats = extract_split(trainer, backbone, data, directory=Path(tmp) / "shards",
                              key=cache_key(backbone=args.backbone, dataset="bench", split="train"),
                              expected_labels=np.array(labels), shard_images=args.shard_images,
                              batch_size=args.batch, num_workers=args.workers, channels_last=True, desc="bench")
        extraction = time.perf_counter() - start
        rss_extraction = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rows = feats.rows(device=torch.device("cpu"), chunk_rows=args.chunk_rows)
        extraction_peaks = dict(sampler.phase)
        sampler.reset()
        start = time.perf_counter()
        fit_logistic(rows, None, 10, 1.0, max_iter=args.probe_iterations)
        probe = time.perf_counter() - start
        per_part = -(-1000 // len(rows.parts))  # queries from every shard, not only the first
        picked, offset = [], 0
        for part in rows.parts:
            picked.append((part, offset, min(per_part, part.length)))
            offset += part.length
        q = torch.cat([part.read(0, n) for part, _, n in picked])[:1000]
        q_labels = torch.cat([rows.labels[o:o + n] for _, o, n in picked])[:1000]
        queries = Rows.from_tensors(q, q_labels, chunk_rows=args.chunk_rows)
        start = time.perf_counter()
        knn_predict(rows, None, queries, 10, k=20, temperature=0.07)
        knn = time.perf_counter() - start
        disk = sum(p.stat().st_size for p in feats.paths)
        streamed_peaks = dict(sampler.phase)
    sampler.stop()
    mib = lambda peaks, key: peaks.get(key, float("nan")) / 1024  # noqa: E731
    return {"n": args.n, "images_per_s": args.n / extraction, "probe_s": probe, "knn_s": knn,
            "rss_import_mib": baseline / 1024, "rss_extraction_mib": rss_extraction / 1024,
            "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "queries": len(q), "features_mib": disk / 2**20,
            "anon_extraction_mib": mib(extraction_peaks, "RssAnon"),
            "anon_streamed_mib": mib(streamed_peaks, "RssAnon"),
            "file_streamed_mib": mib(streamed_peaks, "RssFile"), "anon_peak_mib": mib(sampler.peaks, "RssAnon"),
            "file_peak_mib": mib(sampler.peaks, "RssFile")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--backbone", default="rs50")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-images", type=int, default=1024)
    p.add_argument("--chunk-rows", type=int, default=1024)
    p.add_argument("--probe-iterations", type=int, default=20)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)  # one size, in a child process
    args = p.parse_args(argv)
    if args.n is not None:
        print(json.dumps(one_size(args)))
        return
    from transfer.tables import table_head, table_row  # here: the child's import-RSS figure stays the task's own

    print(f"machine: {platform.machine()}, backbone {args.backbone} (random weights), {args.resolution}px input, "
          f"batch {args.batch}, {args.workers} loader workers, shards of {args.shard_images} images, chunks of "
          f"{args.chunk_rows} rows, float32")
    print(f"command: python bench/bench_features.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(table_head(["N", "extraction images/s", "probe fit s", "k-NN s (queries)", "features on disk MiB",
                      "peak RSS main MiB", "peak RSS largest worker MiB", "RSS after import MiB",
                      "peak RssAnon extraction MiB", "peak RssAnon probe+k-NN MiB", "peak RssFile probe+k-NN MiB"]))
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, *base, "--n", str(n)], capture_output=True, text=True,
                             env={"PYTHONPATH": str(REPO), **_env()}, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(table_row([n, f"{r['images_per_s']:.1f}", f"{r['probe_s']:.2f}", f"{r['knn_s']:.2f} ({r['queries']})",
                         f"{r['features_mib']:.1f}", f"{r['rss_peak_mib']:.0f}", f"{r['rss_worker_peak_mib']:.0f}",
                         f"{r['rss_import_mib']:.0f}", f"{r['anon_extraction_mib']:.0f}",
                         f"{r['anon_streamed_mib']:.0f}", f"{r['file_streamed_mib']:.0f}"]), flush=True)


def _env() -> dict:
    import os
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


if __name__ == "__main__":
    main()
