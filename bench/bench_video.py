"""Video memory and speed, measured side by side in one run: the loader vs the train step, at real sizes.

    python bench/bench_video.py [--backbone rs50] [--sizes 340x256,1920x1080] [--batch 2] [--workers 2] [--steps 2]
                                [--only memory|speed]
    python bench/bench_video.py --recipe-run [--backbone rs50]

Writes H.264 clips (libx264 through PyAV; 10 s at 30 fps by default) at each ``--sizes`` to a temporary
folder, then prints, with the recipe's clip (32 frames x stride 2 at 30 fps, 224 px train crop, 3 x 256 px
test crops):

* per source size, each in a fresh process: peak RSS and time of one train item (decode + sample + augment),
  one test item (a temporal clip with its 3 crops), and the same clip read the way pytorchvideo's
  ``EncodedVideo`` reads it (every frame of the window, full size, float) as the side-by-side reference;
* loader clips/s (DataLoader over the clips, ``--workers`` processes, no model) vs train step clips/s (forward,
  backward, SGD on a resident batch, bf16 autocast where the CPU has it, as ``precision=auto`` runs) and end
  to end, with the ratios, and the largest worker's peak RSS.

``--recipe-run`` instead writes a tiny Kinetics copy (340x256 H.264, 2 classes, 8 train + 2 val videos) and runs
``python -m transfer.run task=kinetics400`` with the recipe's defaults (only ``trainer.max_steps``, the data and
the weights changed: training, then 10 x 3 view testing), sampling the memory of the whole process tree
(the run and its loader workers, from /proc, Linux) twice a second; prints the peak total RSS and PSS.
Figures only, never pass/fail.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from transfer.config import BackboneConfig
from transfer.engine import cpu_supports_bf16
from transfer.loaders import build_loader
from transfer.tables import markdown_table, table_head, table_row
from video.data import ClipSpec, TrainClips, collate_skipping, official_filename
from video.inflate import InflationConfig
from video.model import VideoClassifier, build_video_backbone
from video.multiview import MultiViewClips
from video.synthetic import write_video
from video.transforms import MultiCropEval, build_train_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REPO = Path(__file__).resolve().parent.parent


def scene(width: int, height: int, seed: int):
    """Frame i of a moving scene: a drifting colour gradient with a square crossing it (cheap to encode at 1080p;
    real footage carries more detail, so real decoding is slower than measured here)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1).astype(np.uint8)
    side = height // 4

    def frame(i: int) -> np.ndarray:
        img = np.roll(base, (i * 3 + seed) % width, axis=1)
        left = (i * width // 90) % (width - side)
        img[height // 3: height // 3 + side, left: left + side] = (255, 255, 255)
        return img

    return frame


def write_clips(folder: Path, size: tuple[int, int], count: int, seconds: float, fps: int) -> list[Path]:
    """``count`` H.264 clips of ``size`` (yuv420p, as YouTube serves Kinetics), written by PyAV's libx264."""
    return [write_video(folder / f"{size[0]}x{size[1]}_{i}.mp4", width=size[0], height=size[1], seconds=seconds,
                        fps=fps, codec="libx264", content=scene(*size, seed=i), codec_options={"preset": "veryfast"})
            for i in range(count)]


def _status_mb(pid: int | str, key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of a process from /proc, in MB."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith(key + ":")), 0.0)


def _reset_peak() -> None:
    """Start a new peak-RSS window for this process (Linux: writing 5 to clear_refs resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_item(kind: str, path: str, args) -> dict:
    """Run in a fresh process: peak RSS (MB) and seconds of reading one item of ``kind``, after one untimed item
    (lazy imports and first-call set-up are not the item's)."""
    read_item(kind, path, args)
    start_rss = _status_mb("self", "VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    out = read_item(kind, path, args)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": _status_mb("self", "VmHWM"),
            "start_rss_mb": start_rss, "shape": tuple(out.shape)}


def read_item(kind: str, path: str, args) -> torch.Tensor:
    spec = ClipSpec(args.frames, args.stride, args.fps)
    if kind == "train":
        tf = build_train_transform(size=args.train_size, mean=MEAN, std=STD)
        out = TrainClips([(path, 0)], spec, tf, short_side=args.decode_short_side)[0]["video"]
    elif kind == "test":
        tf = MultiCropEval(size=args.eval_size, mean=MEAN, std=STD, crops=3)
        out = MultiViewClips([(path, 0)], spec, tf, clips=10, short_side=args.eval_size)[5]["video"]
    else:  # pytorchvideo's EncodedVideo: decodes the whole window at full size into float, then subsamples
        from pytorchvideo.data.encoded_video import EncodedVideo

        video = EncodedVideo.from_path(path, decode_audio=False, decoder="pyav")
        clip = video.get_clip(2.0, 2.0 + float(spec.duration))["video"]  # (C, T, H, W) float
        idx = torch.linspace(0, clip.shape[1] - 1, args.frames).round().long()
        out = clip.index_select(1, idx)
        video.close()
    return out


def in_fresh_process(fn, *a) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, a)


def clips_per_second(batches, step, steps: int) -> tuple[float, int]:
    """Clips/s of ``step`` over ``steps`` batches after one untimed warm-up batch."""
    it = iter(batches())
    step(next(it))
    done, clips, start = 0, 0, time.perf_counter()
    while done < steps:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(batches())
            continue
        step(batch)
        done += 1
        clips += len(batch["label"])
    return clips / (time.perf_counter() - start), clips


def memory_table(tmp: Path, args) -> None:
    print(f"\nOne item, fresh process each (clip {args.frames}x{args.stride} at {args.fps:g} fps; train crop "
          f"{args.train_size} from frames decoded at short side {args.decode_short_side}; test 3 crops of "
          f"{args.eval_size}):")
    print(table_head(["source", "item", "RSS before (MB)", "peak RSS during the item (MB)", "above before (MB)",
                      "s/item", "above before, vs pytorchvideo"]))
    for size in args.sizes:
        path = str(write_clips(tmp / "items", size, 1, args.seconds, int(args.fps))[0])
        rows = {kind: in_fresh_process(measure_item, kind, path, args) for kind in ("pytorchvideo", "train", "test")}
        ref = rows["pytorchvideo"]["peak_rss_mb"] - rows["pytorchvideo"]["start_rss_mb"]
        for kind, r in rows.items():
            above = r["peak_rss_mb"] - r["start_rss_mb"]
            print(table_row([f"{size[0]}x{size[1]}", kind, f"{r['start_rss_mb']:.0f}", f"{r['peak_rss_mb']:.0f}",
                             f"{above:.0f}", f"{r['seconds']:.2f}", f"{above / ref:.3f}"]))


def speed_table(tmp: Path, args) -> None:
    size = args.sizes[0]
    clips = write_clips(tmp / "loader", size, max(args.batch * 2, 4), args.seconds, int(args.fps))
    tf = build_train_transform(size=args.train_size, mean=MEAN, std=STD)
    data = TrainClips([(str(p), i % 2) for i, p in enumerate(clips)], ClipSpec(args.frames, args.stride, args.fps),
                      tf, short_side=args.decode_short_side)
    loader = build_loader(data, batch_size=args.batch, num_workers=args.workers, train=True,
                          collate_fn=collate_skipping)
    backbone = build_video_backbone(BackboneConfig(name=args.backbone, weights="random"),
                                    inflation=InflationConfig(self_gating="last"))
    model = VideoClassifier(backbone, num_classes=400, dropout=0.5).train().to(memory_format=torch.channels_last_3d)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    bf16 = cpu_supports_bf16()

    def train_step(batch) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(batch["video"]), batch["label"])
        loss.backward()
        opt.step()

    resident = next(iter(loader))
    load, _ = clips_per_second(lambda: loader, lambda b: None, args.steps)
    model_only, _ = clips_per_second(lambda: iter(lambda: resident, None), train_step, args.steps)
    end_to_end, _ = clips_per_second(lambda: loader, train_step, args.steps)
    worker_peak = max((_status_mb(pid, "VmHWM") for pid in _tree(os.getpid())[1:]), default=0.0)
    print(f"\n{args.backbone} 3D, {size[0]}x{size[1]} H.264 sources, batch {args.batch}, {args.workers} workers, "
          f"{torch.get_num_threads()} threads, {'bf16 autocast' if bf16 else 'fp32'}:")
    print(markdown_table(["measurement", "clips/s"], [
        ["loader alone (decode + sample + augment)", f"{load:.2f}"],
        ["model train step on resident tensors", f"{model_only:.3f}"],
        ["train step end to end", f"{end_to_end:.3f}"],
        ["**ratio loader / model**", f"**{load / model_only:.1f}** (>1: the model is the bottleneck)"],
        ["**ratio end-to-end / resident**", f"**{end_to_end / model_only:.2f}** (1 = loading fully hidden)"]]))
    print(f"largest loader worker peak RSS: {worker_peak:.0f} MB; this process (model, optimiser, batches): "
          f"{_status_mb('self', 'VmHWM'):.0f} MB")


def _tree(root: int) -> list[int]:
    """``root`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of ``pid`` in KiB; PSS shares pages between the processes mapping them (no double counting)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    fields = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()[1:] if line.endswith("kB")}
    return fields.get("Rss", 0), fields.get("Pss", 0)


def recipe_run(tmp: Path, args) -> None:
    root = tmp / "k400"
    for split, per_class in (("train", 4), ("val", 1)):
        rows = ["label,youtube_id,time_start,time_end,split"]
        for c, label in enumerate(("abseiling", "air drumming")):
            for k in range(per_class):
                vid = f"{split[:2]}{c}{k}vid"
                rows.append(f"{label},{vid},0,10,{split}")
                write_video(root / split / official_filename(vid, 0, 10), width=340, height=256, seconds=10, fps=30,
                            codec="libx264", content=scene(340, 256, seed=10 * c + k))
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    cmd = [sys.executable, "-m", "transfer.run", "task=kinetics400", f"backbone={args.backbone}",
           "backbone.weights=random", f"task.data_dir={root}", "task.num_classes=2", "trainer.max_steps=1",
           f"run.dir={tmp / 'run'}"]
    print("running:", " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    start = time.time()
    out_path = tmp / "run.log"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT)
        peak_rss = peak_pss = peak_procs = 0
        while proc.poll() is None:
            mem = [_memory_kb(p) for p in _tree(proc.pid)]
            peak_rss, peak_pss = max(peak_rss, sum(m[0] for m in mem)), max(peak_pss, sum(m[1] for m in mem))
            peak_procs = max(peak_procs, len(mem))
            time.sleep(0.5)
    print(out_path.read_text()[-1500:])
    results = tmp / "run" / "results.json"
    if results.is_file():
        r = json.loads(results.read_text())
        print("metrics:", r["metrics"], "\ncounts:", r["counts"], "\nviews:", r["recipe"].get("views"),
              "global batch:", r["recipe"].get("global_batch"))
    print(f"exit {proc.returncode} after {time.time() - start:.0f} s; peak over the process tree (up to "
          f"{peak_procs} processes): RSS {peak_rss / 2**20:.2f} GiB, PSS {peak_pss / 2**20:.2f} GiB "
          f"(sampled every 0.5 s)")


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="rs50")
    p.add_argument("--sizes", default="340x256,1920x1080", type=lambda s: [_size(x) for x in s.split(",")])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--train-size", type=int, default=224)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--decode-short-side", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--only", choices=("memory", "speed"), help="print only one of the two tables")
    p.add_argument("--recipe-run", action="store_true", help="run transfer.run with the recipe's defaults instead")
    args = p.parse_args(argv)
    np.random.seed(0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.recipe_run:
            recipe_run(Path(tmp), args)
            return
        if args.only != "speed":
            memory_table(Path(tmp), args)
        if args.only != "memory":
            speed_table(Path(tmp), args)


if __name__ == "__main__":
    main()
