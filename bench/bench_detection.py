"""Training iteration time of a registry backbone vs detectron2's built-in R-50, same detector config.

    python bench/bench_detection.py [--backbone rs50] [--config PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml]
                                    [--size 320] [--batch 2] [--steps 5] [--freeze-at 2] [--norm BN] [--device cpu]

Both detectors come from one detectron2 model-zoo config; only the bottom-up network differs
(registry backbone through tasks/detection vs detectron2's ResNet-50, the same norm and frozen
levels, random weights). The norm defaults to BN: with random weights, FrozenBN's unit statistics
let detectron2's R-50 activations overflow. Steps (forward, backward, SGD) on the same in-memory batch of random images
with a few boxes alternate between the two models, so both see the same machine load. Prints
milliseconds per iteration, parameters, and the ratio. Figures only, never pass/fail.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from tasks.detection.backbone import add_transfer_backbone_config
from tasks.detection.config import use_registry_backbone


def detector(args, registry_backbone: str | None) -> torch.nn.Module:
    cfg = get_cfg()
    add_transfer_backbone_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(args.config))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.BACKBONE.FREEZE_AT = args.freeze_at
    cfg.MODEL.RESNETS.NORM = args.norm
    if registry_backbone:
        use_registry_backbone(cfg, registry_backbone, weights="random", norm=args.norm, freeze_at=args.freeze_at)
    model = build_model(cfg)
    model.train()
    return model


def batch(args) -> list[dict]:
    """``args.batch`` random images of ``size`` x ``1.33 size`` with three boxes (and masks) each."""
    gen = torch.Generator().manual_seed(0)
    h, w = args.size, args.size * 4 // 3
    out = []
    for _ in range(args.batch):
        xy = torch.rand(3, 2, generator=gen) * torch.tensor([w / 2, h / 2])
        boxes = torch.cat([xy, xy + torch.tensor([w / 3, h / 3])], dim=1)  # (3, 4) x0 y0 x1 y1
        inst = Instances((h, w), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([0, 1, 2]))
        inst.gt_masks = PolygonMasks([[b[[0, 1, 2, 1, 2, 3, 0, 3]].tolist()] for b in boxes])
        out.append({"image": torch.rand(3, h, w, generator=gen) * 255, "instances": inst, "height": h, "width": w})
    return out


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list[dict]) -> float:
    start = time.perf_counter()
    loss = sum(model(data).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="rs50")
    parser.add_argument("--config", default="PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml")
    parser.add_argument("--size", type=int, default=320, help="shorter image side in pixels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--freeze-at", type=int, default=2)
    parser.add_argument("--norm", default="BN", choices=["BN", "FrozenBN"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    models = {args.backbone: detector(args, args.backbone), "detectron2 R-50": detector(args, None)}
    optimizers = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
                  for k, m in models.items()}
    data = batch(args)
    times = {k: [] for k in models}
    with EventStorage(0):  # detectron2's losses record statistics into the current storage
        for i in range(args.warmup + args.steps):
            for name, model in models.items():
                seconds = step(model, optimizers[name], data)
                if i >= args.warmup:
                    times[name].append(seconds)

    print(f"{args.config}, {args.batch} images of {args.size}x{args.size * 4 // 3}, freeze_at={args.freeze_at}, "
          f"{args.norm}, {args.device}, {torch.get_num_threads()} threads, median of {args.steps} steps")
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        print(f"  {name:>16}: {1000 * statistics.median(times[name]):8.1f} ms/iter  "
              f"({params:.1f}M parameters, {trained:.1f}M trained)")
    a, b = (statistics.median(t) for t in times.values())
    print(f"  ratio {args.backbone} / detectron2 R-50: {a / b:.2f}x")


if __name__ == "__main__":
    main()
