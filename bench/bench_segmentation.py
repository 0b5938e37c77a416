"""Training iteration time of Semantic FPN on a registry backbone vs detectron2's built-in R-50, same config.

    python bench/bench_segmentation.py [--backbone rs50] [--size 512] [--batch 2] [--steps 5] [--freeze-at 2]
                                       [--norm BN] [--classes 150] [--device cpu]

Both models come from detectron2's ``Misc/semantic_R_50_FPN_1x.yaml`` (FPN + SemSegFPNHead in a
SemanticSegmentor); only the bottom-up network differs (registry backbone through tasks/detection's FPN
builder vs detectron2's ResNet-50, same norm and frozen levels, random weights). Steps (forward,
backward, SGD) on the same in-memory batch of random images and random label maps (with a band of 255,
not scored) alternate between the two models, so both see the same machine load. Prints milliseconds
per iteration, parameters, the first and last loss of each arm (both must be finite and fall; ln(classes)
is printed for scale: random MSRA-initialised logits start above it), and the ratio. Figures only,
never pass/fail.
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tasks.detection.backbone import add_transfer_backbone_config
from tasks.detection.translate import use_registry_backbone
from transfer.bench import timed_loss_step
from transfer.config import BackboneConfig

CONFIG = "Misc/semantic_R_50_FPN_1x.yaml"


def segmentor(args, registry_backbone: str | None) -> torch.nn.Module:
    cfg = get_cfg()
    add_transfer_backbone_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(CONFIG))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.BACKBONE.FREEZE_AT = args.freeze_at
    cfg.MODEL.RESNETS.NORM = args.norm
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = args.classes
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    if registry_backbone:
        use_registry_backbone(cfg, BackboneConfig(name=registry_backbone, weights="random"), norm=args.norm,
                              freeze_at=args.freeze_at)
    model = build_model(cfg)
    model.train()
    return model


def batch(args) -> list[dict]:
    """``args.batch`` random 0-255 images of ``size`` x ``size`` with random labels and a 255 band."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.batch):
        label = torch.randint(0, args.classes, (args.size, args.size), generator=gen)
        label[: args.size // 8] = 255
        out.append({"image": torch.rand(3, args.size, args.size, generator=gen) * 255, "sem_seg": label,
                    "height": args.size, "width": args.size})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="rs50")
    parser.add_argument("--size", type=int, default=512, help="square crop in pixels (ADE20K recipe: 512)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--freeze-at", type=int, default=2)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--norm", default="BN", choices=["BN", "FrozenBN"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    models = {args.backbone: segmentor(args, args.backbone), "detectron2 R-50": segmentor(args, None)}
    optimizers = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
                  for k, m in models.items()}
    data = batch(args)
    times: dict[str, list[float]] = {k: [] for k in models}
    losses: dict[str, list[float]] = {k: [] for k in models}
    with EventStorage(0):
        for i in range(args.warmup + args.steps):
            for name, model in models.items():
                seconds, loss = timed_loss_step(model, optimizers[name], data, args.device)
                losses[name].append(loss)
                if i >= args.warmup:
                    times[name].append(seconds)

    print(f"{CONFIG}, {args.batch} images of {args.size}x{args.size}, {args.classes} classes, "
          f"freeze_at={args.freeze_at}, {args.norm}, {args.device}, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps")
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        sane = all(math.isfinite(v) for v in losses[name])
        print(f"  {name:>16}: {1000 * statistics.median(times[name]):8.1f} ms/iter  ({params:.1f}M parameters, "
              f"{trained:.1f}M trained)  loss {losses[name][0]:.3f} -> {losses[name][-1]:.3f} "
              f"(ln {args.classes} = {math.log(args.classes):.3f}){'' if sane else '  NOT FINITE'}")
    a, b = (statistics.median(t) for t in times.values())
    print(f"  ratio {args.backbone} / detectron2 R-50: {a / b:.2f}x")


if __name__ == "__main__":
    main()
