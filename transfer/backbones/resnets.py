"""Supervised entries: ResNet-RS (timm's ports of the official checkpoints) and the ResNets they are compared with."""
from __future__ import annotations

from transfer.backbones import BackboneSpec, register_backbone

TPU_README = "tensorflow/tpu models/official/resnet/resnet_rs/README.md @bee9c4f (seed checkpoint table)"
# Official evaluation crops the centre 87.5% (tensorflow/tpu models/official/resnet/resnet_preprocessing.py,
# CROP_FRACTION = 0.875) with bicubic resizing, and normalises with the ImageNet mean/std.
TF_CROP = 0.875

# ResNet-RS: (depth, resolution of the checkpoint timm ports, published top-1). timm's file names
# (rs101_i192_ema, rs152_i256_ema, rs350_i256_ema, …) say which checkpoint each port is; the seed
# table gives the top-1 of that checkpoint at its own resolution.
RESNET_RS = [(50, 160, 78.8), (101, 192, 81.2), (152, 256, 83.0), (200, 256, 83.4),
             (270, 256, 83.8), (350, 256, 84.0), (420, 320, 84.4)]

for depth, res, top1 in RESNET_RS:
    register_backbone(BackboneSpec(
        name=f"rs{depth}", arch=f"resnetrs{depth}", family="resnet_rs", train_res=res, test_res=res,
        crop_pct=TF_CROP, hub_id=f"timm/resnetrs{depth}.tf_in1k", top1=top1, checkpoint=f"resnet-rs-{depth}-i{res}",
        source=f"{TPU_README}; weights: timm resnetrs{depth}.tf_in1k"))

# torchvision's original ResNet-50 weights (IMAGENET1K_V1: resize 256, crop 224, bilinear; top-1 76.13
# per torchvision's weights metadata). torchvision and timm share the ResNet-50 key layout.
register_backbone(BackboneSpec(
    name="resnet50", arch="resnet50", family="resnet", train_res=224, test_res=224, crop_pct=224 / 256,
    interpolation="bilinear", url="https://download.pytorch.org/models/resnet50-0676ba61.pth", top1=76.13,
    source="torchvision ResNet50_Weights.IMAGENET1K_V1"))

# "ResNet strikes back" (Wightman et al. 2021) procedures A1/A2/A3; values from timm's pretrained cfgs
# resnet50.a{1,2,3}_in1k. Top-1 at 224 from the paper's Table 1 is not carried here: not read.
for proc, train_res in (("a1", 224), ("a2", 224), ("a3", 160)):
    register_backbone(BackboneSpec(
        name=f"resnet50_rsb_{proc}", arch="resnet50", family="resnet", train_res=train_res, test_res=224,
        crop_pct=0.95, hub_id=f"timm/resnet50.{proc}_in1k", source=f"timm resnet50.{proc}_in1k"))

# ResNet-vd (ResNet-D): timm's ra2 weights (timm pretrained cfgs resnet{depth}d.ra2_in1k).
for depth, train_res, crop in ((50, 224, 0.875), (101, 256, 0.95), (152, 256, 0.95), (200, 256, 0.95)):
    register_backbone(BackboneSpec(
        name=f"resnet{depth}d", arch=f"resnet{depth}d", family="resnet_d", train_res=train_res,
        test_res=train_res, crop_pct=crop, hub_id=f"timm/resnet{depth}d.ra2_in1k",
        source=f"timm resnet{depth}d.ra2_in1k"))
