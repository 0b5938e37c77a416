"""ResNet-RS entries: ``rs{depth}`` (timm's port of one official checkpoint per depth) and all eleven official
checkpoints as ``rs{depth}_i{res}``.

timm ports one checkpoint per depth (its file names say which: rs101_i192_ema, rs152_i256_ema, ...;
``default_cfgs`` in timm/models/resnet.py), so those seven ``rs{depth}_i{res}`` entries download timm's port, like
their ``rs{depth}`` alias; the other four exist only as TF1 tarballs. Every ``rs{depth}_i{res}`` entry converts an
official tarball, folder or ``.index`` file on first use (``backbone.weights=/path/resnet-rs-152-i192.tar.gz``).
"""
from __future__ import annotations

from functools import partial

from transfer.backbones.spec import BackboneSpec, register_backbone
from transfer.convert.resnet_rs_tf import (
    OFFICIAL_CHECKPOINTS,
    TARBALL_URL,
    convert_for_backbone,
    entry_name,
)

TPU_README = "tensorflow/tpu models/official/resnet/resnet_rs/README.md @bee9c4f (seed checkpoint table)"
# Official evaluation crops the centre 87.5% (tensorflow/tpu models/official/resnet/resnet_preprocessing.py,
# CROP_FRACTION = 0.875) with bicubic resizing, and normalises with the ImageNet mean/std.
TF_CROP = 0.875

# (depth, resolution of the checkpoint timm ports, published top-1). timm's file names (rs101_i192_ema,
# rs152_i256_ema, rs350_i256_ema, …) say which checkpoint each port is; the seed table gives the top-1 of that
# checkpoint at its own resolution.
RESNET_RS = [(50, 160, 78.8), (101, 192, 81.2), (152, 256, 83.0), (200, 256, 83.4),
             (270, 256, 83.8), (350, 256, 84.0), (420, 320, 84.4)]
# depth -> resolution of the checkpoint that timm's resnetrs{depth}.tf_in1k was converted from.
TIMM_PORTED = {depth: res for depth, res, _ in RESNET_RS}

for depth, res, top1 in RESNET_RS:
    register_backbone(BackboneSpec(
        name=f"rs{depth}", arch=f"resnetrs{depth}", family="resnet_rs", train_res=res, test_res=res,
        crop_pct=TF_CROP, hub_id=f"timm/resnetrs{depth}.tf_in1k", top1=top1, checkpoint=f"resnet-rs-{depth}-i{res}",
        source=f"{TPU_README}; weights: timm resnetrs{depth}.tf_in1k"))

for depth, res, top1 in OFFICIAL_CHECKPOINTS:
    name = entry_name(depth, res)
    url = TARBALL_URL.format(depth=depth, res=res)
    ported = TIMM_PORTED[depth] == res
    hint = (f"The official checkpoint is {url}; convert it once with `python -m transfer.convert "
            f"resnet_rs_tf resnet-rs-{depth}-i{res}.tar.gz {name}.safetensors`, or pass the tarball itself "
            f"as backbone.weights (converted on first use).")
    register_backbone(BackboneSpec(
        name=name, arch=f"resnetrs{depth}", family="resnet_rs", train_res=res, test_res=res, crop_pct=TF_CROP,
        hub_id=f"timm/resnetrs{depth}.tf_in1k" if ported else None,
        convert=partial(convert_for_backbone, name=name, depth=depth), download_hint=hint, top1=top1,
        checkpoint=f"resnet-rs-{depth}-i{res}",
        source=f"{TPU_README}; checkpoint {url}" + (f"; weights: timm resnetrs{depth}.tf_in1k" if ported else "")))
