"""All eleven official ResNet-RS checkpoints as ``rs{depth}_i{res}`` entries.

timm ports one checkpoint per depth (its file names say which: rs101_i192_ema, rs152_i256_ema, ...;
``default_cfgs`` in timm/models/resnet.py), so those seven entries download timm's port; the other four exist
only as TF1 tarballs. Every entry converts an official tarball, folder or ``.index`` file on first use
(``backbone.weights=/path/resnet-rs-152-i192.tar.gz``). ``rs{depth}`` (transfer/backbones/resnets.py)
stays the alias of the checkpoint timm ports.
"""
from __future__ import annotations

from functools import partial

from transfer.backbones import BackboneSpec, register_backbone
from transfer.backbones.resnets import RESNET_RS, TF_CROP, TPU_README
from transfer.convert.resnet_rs_tf import (
    OFFICIAL_CHECKPOINTS,
    TARBALL_URL,
    convert_for_backbone,
    entry_name,
)

# depth -> resolution of the checkpoint that timm's resnetrs{depth}.tf_in1k was converted from.
TIMM_PORTED = {depth: res for depth, res, _ in RESNET_RS}

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
