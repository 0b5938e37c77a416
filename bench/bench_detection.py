"""A registry backbone in a detectron2 detector vs detectron2's own R-50, like with like, timed side by side.

    python bench/bench_detection.py [--backbone rs50] [--config PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml]
                                    [--size 320] [--batch 2] [--steps 5] [--warmup 2] [--freeze-at 2]
                                    [--norm FrozenBN] [--device cpu]

Three detectors from one detectron2 model-zoo config, differing only in the bottom-up network:

- ``--backbone`` (default rs50) through the suite's wrapper (tasks/detection/backbone.py), RGB input with
  its own mean/std, as a detection run builds it;
- ``resnet50`` (the registry's torchvision ResNet-50) through the same wrapper: the wrapper's cost;
- detectron2's built-in R-50 (``build_resnet_fpn_backbone``, ``STRIDE_IN_1X1 False``: the torchvision
  layout), BGR input with the same ImageNet statistics in BGR order, as its configs expect.

All three share the norm (``--norm``), the frozen levels (``--freeze-at``), the solver, the images and the
boxes. Weights are random (speed does not depend on their values), but every batch-norm layer, frozen or
not, gets statistics measured on the bench images, level by level, so activations stay in range in every
arm (identity FrozenBN statistics under unnormalised pixels make R-50's activations and losses explode).
The script prints each arm's largest FPN activation and its count of non-finite losses to show that.

Timed, alternating between the arms so they see the same machine load: the bottom-up network alone
(forward + backward) and the whole training step (forward, losses, backward, SGD). Prints medians,
GMACs of one bottom-up forward pass, and ratios. ``--profile`` adds, per arm, the operators that take the
most time in one bottom-up forward + backward (torch.profiler), which names where a slower backbone spends
it. Figures only, never pass/fail.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tasks.detection.backbone import add_transfer_backbone_config
from tasks.detection.translate import use_registry_backbone
from transfer.bench import sync, timed_loss_step
from transfer.config import BackboneConfig

D2_R50 = "detectron2 R-50"
# torchvision's ImageNet statistics in 0-255 pixels, in detectron2's default BGR order.
BGR_MEAN, BGR_STD = [103.530, 116.280, 123.675], [57.375, 57.120, 58.395]


def detector(args, registry_backbone: str | None) -> nn.Module:
    cfg = get_cfg()
    add_transfer_backbone_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(args.config))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.BACKBONE.FREEZE_AT = args.freeze_at
    cfg.MODEL.RESNETS.NORM = args.norm
    if registry_backbone:
        use_registry_backbone(cfg, BackboneConfig(name=registry_backbone, weights="random"), norm=args.norm,
                              freeze_at=args.freeze_at)
    else:
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
        cfg.INPUT.FORMAT, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = "BGR", BGR_MEAN, BGR_STD
    model = build_model(cfg)
    model.input_format = cfg.INPUT.FORMAT
    return model


def batch(args) -> list[dict]:
    """``args.batch`` random RGB images of ``size`` x ``1.33 size`` (0-255) with three boxes (and masks) each."""
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


def in_format(data: list[dict], fmt: str) -> list[dict]:
    """The same images in the channel order a model reads (RGB images flipped for BGR models)."""
    return [{**d, "image": d["image"].flip(0) if fmt == "BGR" else d["image"]} for d in data]


@torch.no_grad()
def calibrate_norms(bottom_up: nn.Module, x: torch.Tensor) -> None:
    """Give every batch norm (frozen or not) the mean/variance of its own input on ``x``, in one ordered pass.

    A pre-hook sets each layer's statistics from the input it receives, which already went through the
    calibrated layers before it; the forward pass runs in eval mode so those statistics are used.
    """
    def hook(module, inputs):
        flat = inputs[0].transpose(0, 1).reshape(inputs[0].shape[1], -1)  # (C, B*H*W)
        module.running_mean.copy_(flat.mean(1))
        module.running_var.copy_(flat.var(1, unbiased=False))

    norms = [m for m in bottom_up.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    handles = [m.register_forward_pre_hook(hook) for m in norms]
    training = bottom_up.training
    bottom_up.eval()
    try:
        bottom_up(x)
    finally:
        for h in handles:
            h.remove()
        bottom_up.train(training)


def time_backbone(model: nn.Module, x: torch.Tensor, device: str) -> float:
    """Bottom-up network alone: forward and backward of its feature maps."""
    start = time.perf_counter()
    loss = sum(f.float().mean() for f in model.backbone.bottom_up(x).values())
    if loss.requires_grad:
        loss.backward()
    sync(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def profile_backbone(name: str, model: nn.Module, x: torch.Tensor, top: int = 8) -> None:
    """Print the operators taking the most self time in one bottom-up forward + backward."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        time_backbone(model, x, x.device.type)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    shares = ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}% ({e.count}x)" for e in events[:top])
    print(f"  {name}: {total / 1000:.0f} ms self CPU time; {shares}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="rs50")
    parser.add_argument("--config", default="PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml")
    parser.add_argument("--size", type=int, default=320, help="shorter image side in pixels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--freeze-at", type=int, default=2)
    parser.add_argument("--norm", default="FrozenBN", choices=["FrozenBN", "BN"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="also print each arm's costliest bottom-up operators")
    args = parser.parse_args()

    torch.manual_seed(0)
    arms = dict.fromkeys([args.backbone, "resnet50"]) | {D2_R50: None}
    models = {name: detector(args, None if name == D2_R50 else name) for name in arms}
    raw = batch(args)
    data = {name: in_format(raw, m.input_format) for name, m in models.items()}
    inputs, flops, peak = {}, {}, {}
    for name, model in models.items():
        model.train()
        x = model.preprocess_image(data[name]).tensor  # (B, 3, H', W'): normalised and padded as in training
        calibrate_norms(model.backbone.bottom_up, x)
        inputs[name] = x
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.backbone.bottom_up(x)
        flops[name] = counter.get_total_flops() / 2 / 1e9 / x.shape[0]  # GMACs per image
        model.eval()
        with torch.no_grad():
            peak[name] = max(float(f.abs().max()) for f in model.backbone(x).values())
        model.train()
    optimizers = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
                  for k, m in models.items()}
    backbone_s = {k: [] for k in models}
    step_s = {k: [] for k in models}
    bad_losses = dict.fromkeys(models, 0)
    with EventStorage(0):  # detectron2's losses record statistics into the current storage
        for i in range(args.warmup + args.steps):
            for name, model in models.items():
                b = time_backbone(model, inputs[name], args.device)
                s, loss = timed_loss_step(model, optimizers[name], data[name], args.device)
                bad_losses[name] += not math.isfinite(loss)
                if i >= args.warmup:
                    backbone_s[name].append(b)
                    step_s[name].append(s)

    h, w = args.size, args.size * 4 // 3
    print(f"{args.config}, {args.batch} images of {h}x{w}, freeze_at={args.freeze_at}, {args.norm} (statistics "
          f"measured on the images), {args.device}, {torch.get_num_threads()} threads, median of {args.steps} steps")
    print(f"{'arm':>18} | {'bottom-up fwd+bwd ms':>20} | {'train step ms':>13} | {'GMACs/img':>9} | "
          f"{'max |FPN|':>9} | {'non-finite losses':>17} | {'params M':>8}")
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:>18} | {1000 * statistics.median(backbone_s[name]):20.1f} | "
              f"{1000 * statistics.median(step_s[name]):13.1f} | {flops[name]:9.2f} | {peak[name]:9.2f} | "
              f"{bad_losses[name]:>17} | {params:8.1f}")

    def ratio(a: str, b: str, times: dict) -> float:
        return statistics.median(times[a]) / statistics.median(times[b])

    for a, b in ((args.backbone, D2_R50), ("resnet50", D2_R50), (args.backbone, "resnet50")):
        print(f"ratio {a} / {b}: bottom-up {ratio(a, b, backbone_s):.2f}x, whole step {ratio(a, b, step_s):.2f}x, "
              f"GMACs {flops[a] / flops[b]:.2f}x")
    if args.profile:
        print("bottom-up forward + backward, operators by self CPU time:")
        for name, model in models.items():
            profile_backbone(name, model, inputs[name])


if __name__ == "__main__":
    main()
