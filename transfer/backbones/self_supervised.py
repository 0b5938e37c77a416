"""Self-supervised ResNet-50 entries: SimCLR, SimCLRv2, BYOL, MoCo v2/v3 and DINO, from their official releases.

Every release is a standard ResNet-50 (torchvision v1.5 layout: stride on the 3x3 conv), so all use
timm's ``resnet50`` at 224 pixels with an 87.5 % centre crop, and a converter in ``transfer/convert`` turns the
official file into timm keys. The entries differ only in the values of :data:`RELEASES`. Entries with a public
direct URL download and convert on ``weights=pretrained``; SimCLR's TF checkpoints are fetched by hand
(``download_hint``) and converted with ``python -m transfer.convert``. ``top1`` is each release's published
ImageNet linear-evaluation top-1.
"""
from __future__ import annotations

from transfer.backbones.spec import BackboneSpec, register_backbone
from transfer.convert.byol import convert_byol
from transfer.convert.dino import convert_dino
from transfer.convert.moco import convert_moco_v2, convert_moco_v3
from transfer.convert.simclr import convert_simclr

# SimCLR networks take RGB in [0, 1] with no mean/std normalisation (tonylins/simclr-converter
# README; Separius/SimCLRv2-Pytorch verify.py; ssl-transfer needs --no-norm for SimCLR). Evaluation
# centre-crops 87.5% (google-research/simclr data_util.py CROP_PROPORTION = 0.875) with bicubic resizing.
NO_NORM = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
SIMCLR_V1_URL = "https://storage.cloud.google.com/simclr-gcs/checkpoints/ResNet50_1x.zip"
SIMCLR_V2_URL = "https://storage.googleapis.com/simclr-checkpoints/simclrv2/pretrained/r50_1x_sk0/"


def _offline(release_file: str, converter: str, name: str) -> str:
    return (f"Offline: fetch {release_file} on another machine and run "
            f"python -m transfer.convert {converter} {release_file} {name}.safetensors")


# name -> the values in which the releases differ.
RELEASES: dict[str, dict] = {
    "simclr_r50": dict(
        **NO_NORM, convert=convert_simclr, top1=69.1,
        download_hint=(f"Download the SimCLR v1 ResNet-50 (1x) TensorFlow checkpoint {SIMCLR_V1_URL}, unzip it and "
                       "convert it once: python -m transfer.convert simclr ResNet50_1x simclr_r50.safetensors"),
        source="google-research/simclr README.md @383d414 (checkpoint, ImageNet linear top-1 69.1)"),
    "simclrv2_r50_1x_sk0": dict(
        **NO_NORM, convert=convert_simclr, top1=71.7,
        download_hint=(f"Download the SimCLRv2 r50_1x_sk0 'pretrained' TensorFlow checkpoint: the files checkpoint, "
                       f"model.ckpt-250228.index and model.ckpt-250228.data-00000-of-00001 from {SIMCLR_V2_URL} "
                       "(or gsutil cp -r gs://simclr-checkpoints/simclrv2/pretrained/r50_1x_sk0 .) into a folder "
                       "r50_1x_sk0, and convert it once: "
                       "python -m transfer.convert simclr r50_1x_sk0 simclrv2_r50_1x_sk0.safetensors"),
        source="google-research/simclr README.md @383d414 Table 1 (r50 1x sk0, linear eval 71.7); file list "
               "and step from Separius/SimCLRv2-Pytorch download.py"),
    # BYOL evaluates on a 224 centre crop of the image resized to 256 (bicubic) and normalises with the
    # ImageNet mean/std (arXiv 2006.07733, appendix on image augmentations). Top-1 74.3: abstract.
    "byol_r50": dict(
        url="https://storage.googleapis.com/deepmind-byol/checkpoints/pretrain_res50x1.pkl",
        convert=convert_byol, top1=74.3, download_hint=_offline("pretrain_res50x1.pkl", "byol", "byol_r50"),
        source="DeepMind's checkpoint URL as used by linusericsson/ssl-transfer download_and_prepare_models.py; "
               "BYOL arXiv 2006.07733 abstract (74.3)"),
    # MoCo v2 and v3 evaluate with torchvision's Resize(256) + CenterCrop(224), bilinear, ImageNet mean/std
    # (facebookresearch/moco and moco-v3 main_lincls.py).
    "moco_v2_r50": dict(
        interpolation="bilinear", convert=convert_moco_v2, top1=71.1,
        url="https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
        download_hint=_offline("moco_v2_800ep_pretrain.pth.tar", "moco_v2", "moco_v2_r50"),
        source="facebookresearch/moco README.md @5670021 (MoCo v2 800 epochs, top-1 71.1, md5 a04e12f8)"),
    "moco_v3_r50": dict(
        interpolation="bilinear", convert=convert_moco_v3, top1=74.6,
        url="https://dl.fbaipublicfiles.com/moco-v3/r-50-1000ep/r-50-1000ep.pth.tar",
        download_hint=_offline("r-50-1000ep.pth.tar", "moco_v3", "moco_v3_r50"),
        source="facebookresearch/moco-v3 CONFIG.md @38aae44 (ResNet-50 1000 epochs, linear 74.6)"),
    # DINO evaluates with Resize(256, bicubic) + CenterCrop(224) and the ImageNet mean/std
    # (facebookresearch/dino eval_linear.py).
    "dino_r50": dict(
        convert=convert_dino, top1=75.3,
        url="https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
        download_hint="Offline: fetch dino_resnet50_pretrain.pth on another machine and pass it as "
                      "backbone.weights=/path/to/dino_resnet50_pretrain.pth",
        source="facebookresearch/dino hubconf.py dino_resnet50 @144f705 (URL; linear top-1 75.3)"),
}

for name, values in RELEASES.items():
    register_backbone(BackboneSpec(name=name, arch="resnet50", family="ssl", train_res=224, test_res=224,
                                   crop_pct=0.875, **{"interpolation": "bicubic", **values}))
