"""Supervised ImageNet ResNets that ResNet-RS is compared with: torchvision's ResNet-50, "ResNet strikes back"
A1/A2/A3 and ResNet-D (ResNet-RS itself: :mod:`transfer.backbones.resnet_rs`)."""
from __future__ import annotations

from transfer.backbones.spec import BackboneSpec, register_backbone

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
