"""Where does classification transfer time go? Pipelines vs bare model work, measured side by side in one run.

    python bench/bench_classification.py [--backbone rs50] [--images 256] [--size 96] [--resolution 128]
                                         [--batch 32] [--workers 2] [--steps 6]

Writes a synthetic ImageFolder tree (PNG files, real on-disk format) to a temporary folder, then prints:
  * extraction images/s: the linear probe's feature pass (decode + eval transform + forward in inference
    mode, autocast where supported, channels_last) vs the bare forward on tensors already in memory;
  * linear probe: the full 45-value L2 sweep + refit on those features vs the time of one extraction pass;
  * fine-tune images/s: train steps fed by the loader (decode + RandAugment train transform) vs the same
    steps on resident tensors.
Ratios only describe this machine at this moment; figures, never pass/fail.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch import nn

from tasks.classification.datasets import Transformed
from tasks.classification.features import extract
from tasks.classification.linear import fit_logistic, l2_grid, sweep_l2
from tasks.classification.metrics import top1
from transfer.backbones import build_backbone
from transfer.engine import cpu_supports_bf16
from transfer.image_sources import FileImages
from transfer.loaders import build_loader
from transfer.optim import param_groups
from transfer.tables import markdown_table

CLASSES = 10


def write_tree(root: Path, images: int, size: int) -> FileImages:
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(images):
        label = i % CLASSES
        folder = root / "train" / f"class{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
        labels.append(label)
    return FileImages(paths, labels)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bare_forward(backbone: nn.Module, images: int, batch: int, resolution: int, dtype) -> float:
    """Seconds for the forward passes of ``images`` resident images, as in extract()."""
    x = torch.randn(batch, 3, resolution, resolution).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else nullcontext()
    with torch.inference_mode(), autocast:
        backbone(x)  # warm-up
        steps = -(-images // batch)
        return timed(lambda: [backbone(x) for _ in range(steps)])


def train_step_fn(model: nn.Module, dtype):
    opt = torch.optim.SGD(param_groups(model, 1e-4), lr=0.01, momentum=0.9, nesterov=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else nullcontext()

    def step(x, y):
        with autocast:
            loss = loss_fn(model(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="rs50")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=96, help="side of the stored PNG images")
    p.add_argument("--resolution", type=int, default=128, help="model input resolution")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="fine-tune steps timed per variant")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if cpu_supports_bf16() else None
    backbone = build_backbone(args.backbone, weights="random")
    backbone.eval().to(memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_tree(Path(tmp), args.images, args.size)
        eval_tf = create_transform(**backbone.data_config(resolution=args.resolution), is_training=False)

        # 1. Feature extraction: the whole pipeline vs the bare forward.
        feats: dict = {}
        t_extract = timed(lambda: feats.update(out=extract(
            backbone, Transformed(files, eval_tf), batch_size=args.batch, num_workers=args.workers,
            device=torch.device("cpu"), dtype=dtype, channels_last=True, desc="extract")))
        t_bare = bare_forward(backbone, args.images, args.batch, args.resolution, dtype)

        # 2. Linear probe (45-value sweep + refit) on these features vs one extraction pass.
        x, y = feats["out"].features.clone(), feats["out"].labels.clone()  # leave inference mode for autograd
        n_val = len(x) // 5
        train, val = (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val])
        grid = l2_grid(1e-6, 1e5, 45)

        def probe():
            chosen, _ = sweep_l2(train, val, CLASSES, grid, top1, max_iter=200, tolerance=1e-6)
            fit_logistic(x, y, CLASSES, chosen.l2, init=chosen, max_iter=200, tolerance=1e-6)

        t_probe = timed(probe)

        # 3. Fine-tune train step: loader-fed vs resident tensors.
        model = nn.Sequential(build_backbone(args.backbone, weights="random"), nn.Linear(backbone.num_features,
                                                                                         CLASSES))
        model.train().to(memory_format=torch.channels_last)
        step = train_step_fn(model, dtype)
        train_tf = create_transform(**backbone.data_config(train=True, resolution=args.resolution), is_training=True,
                                    auto_augment="rand-m10-n2")
        loader = build_loader(Transformed(files, train_tf), batch_size=args.batch, num_workers=args.workers, train=True)
        xb = torch.randn(args.batch, 3, args.resolution, args.resolution)
        yb = torch.randint(0, CLASSES, (args.batch,))
        step(xb, yb)  # warm-up
        t_step_bare = timed(lambda: [step(xb, yb) for _ in range(args.steps)])

        def fed():
            done = 0
            while done < args.steps:
                for bx, by in loader:
                    step(bx, by)
                    done += 1
                    if done == args.steps:
                        return

        t_step_fed = timed(fed)

    ips = lambda n, t: n / t  # noqa: E731
    ft_images = args.steps * args.batch
    rows = [
        ("feature extraction, end to end (images/s)", f"{ips(args.images, t_extract):.1f}"),
        ("bare forward, resident tensors (images/s)", f"{ips(args.images, t_bare):.1f}"),
        ("ratio end-to-end / bare", f"{t_bare / t_extract:.2f}"),
        ("linear probe: 45-value sweep + refit (s)", f"{t_probe:.2f}"),
        ("one extraction pass (s)", f"{t_extract:.2f}"),
        ("ratio probe / extraction", f"{t_probe / t_extract:.2f}"),
        ("fine-tune step, loader-fed (images/s)", f"{ips(ft_images, t_step_fed):.1f}"),
        ("fine-tune step, resident tensors (images/s)", f"{ips(ft_images, t_step_bare):.1f}"),
        ("ratio loader-fed / resident", f"{t_step_bare / t_step_fed:.2f}"),
    ]
    print(f"command: python bench/bench_classification.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"precision {'bf16 autocast' if dtype else 'fp32'}; backbone {args.backbone} (random weights), "
          f"{args.images} images {args.size}px stored -> {args.resolution}px input, batch {args.batch}, "
          f"{args.workers} loader workers")
    print("\n" + markdown_table(["measurement", "value"], rows))


if __name__ == "__main__":
    main()
