"""Official ResNet-RS TensorFlow 1 checkpoints -> timm ``resnetrs*`` state dicts.

``python -m transfer.convert resnet_rs_tf resnet-rs-152-i192.tar.gz rs152_i192.safetensors``

The TF1 model (tensorflow/tpu models/official/resnet/resnet_model.py @bee9c4f) is built from unscoped
``tf.layers``, so its variables are named by creation order: ``conv2d``, ``conv2d_1``, ... and
``batch_normalization``, ``batch_normalization_1``, ..., then ``dense``. The order is:
- stem: 3x3/s2 conv (32), BN, 3x3 conv (32), BN, 3x3 conv (64), BN, and the 3x3/s2 conv (64) + BN
  that replaces the max-pool (``replace_stem_max_pool``);
- each bottleneck block: [projection 1x1 conv, BN] (first block of a group only), 1x1 conv, BN,
  3x3 conv (carries the stride), BN, 1x1 conv (4x), BN, SE reduce conv (+bias), SE expand conv (+bias)
  (``bottleneck_block``; ``resnet_layers.squeeze_excitation`` creates both SE convs with bias);
- the classifier ``dense/{kernel,bias}`` with kernel (2048, 1000).
sebastian-sz/resnet-rs-keras scripts/convert_weights.py walks the same order. The mapping here is
derived from the block counts alone, so it holds for every depth.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from transfer.convert import CONVERTERS, ConverterSpec
from transfer.convert.tf_checkpoint import TFCheckpoint, extract_checkpoint_tarball, find_checkpoint_prefix
from transfer.errors import WeightsError
from transfer.io import sha256_file
from transfer.weights import diff_state_dict, read_state_dict, write_safetensors

if TYPE_CHECKING:  # type only
    from timm.models.resnet import ResNet

# Blocks per stage (tensorflow/tpu models/official/resnet/resnet_model.py, ``resnet`` model_params;
# the same in timm's resnetrs* definitions).
DEPTH_LAYERS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3),
    270: (4, 29, 53, 4), 350: (4, 36, 72, 4), 420: (4, 44, 87, 4)}

# The eleven official checkpoints: (depth, image size, published ImageNet top-1), from
# tensorflow/tpu models/official/resnet/resnet_rs/README.md @bee9c4f.
OFFICIAL_CHECKPOINTS: tuple[tuple[int, int, float], ...] = (
    (50, 160, 78.8), (101, 160, 80.3), (101, 192, 81.2), (152, 192, 82.0), (152, 224, 82.2),
    (152, 256, 83.0), (200, 256, 83.4), (270, 256, 83.8), (350, 256, 84.0), (350, 320, 84.2),
    (420, 320, 84.4))
TARBALL_URL = "https://storage.googleapis.com/cloud-tpu-checkpoints/resnet-rs/resnet-rs-{depth}-i{res}.tar.gz"

EMA_SUFFIX = "/ExponentialMovingAverage"
MODEL_VARIABLE = re.compile(r"(conv2d(?:_\d+)?/(?:kernel|bias)"
                            r"|batch_normalization(?:_\d+)?/(?:gamma|beta|moving_mean|moving_variance)"
                            r"|dense/(?:kernel|bias))")
BN_FIELDS = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
             ("moving_variance", "running_var"))
RS_WIDTHS = (64, 128, 256, 512)  # bottleneck widths of res2..res5; blocks output 4x


def entry_name(depth: int, res: int) -> str:
    """Registry name of an official checkpoint, e.g. ``rs152_i192``."""
    return f"rs{depth}_i{res}"


def build_resnet_rs(layers: tuple[int, ...], **kwargs) -> ResNet:
    """timm's ResNet-RS at any block layout (timm resnet.py ``resnetrs*``: deep 32-wide stem, stride-2
    conv instead of the stem max-pool, avg-pool shortcuts, SE with rd_ratio 0.25)."""
    from timm.layers import get_attn  # here, not at import: the backbone registry imports this module
    from timm.models.resnet import Bottleneck, ResNet

    attn = partial(get_attn("se"), rd_ratio=0.25)
    return ResNet(block=Bottleneck, layers=tuple(layers), stem_width=32, stem_type="deep",
                  replace_stem_pool=True, avg_down=True, block_args=dict(attn_layer=attn), **kwargs)


@dataclass(frozen=True)
class Variable:
    """One official variable and the timm key it becomes; ``layout`` says how its axes change."""

    tf_name: str
    timm_key: str
    layout: str  # "conv": HWIO -> OIHW; "dense": (in, out) -> (out, in); "vector": as is


def official_variables(layers: tuple[int, ...]) -> list[Variable]:
    """Every variable of the official model with these blocks per stage, in creation order."""
    out: list[Variable] = []
    count = {"conv2d": 0, "batch_normalization": 0}

    def next_name(kind: str) -> str:
        n = count[kind]
        count[kind] += 1
        return kind if n == 0 else f"{kind}_{n}"

    def conv(key: str, bias: bool = False) -> None:
        name = next_name("conv2d")
        out.append(Variable(f"{name}/kernel", f"{key}.weight", "conv"))
        if bias:
            out.append(Variable(f"{name}/bias", f"{key}.bias", "vector"))

    def bn(key: str) -> None:
        name = next_name("batch_normalization")
        out.extend(Variable(f"{name}/{tf_field}", f"{key}.{torch_field}", "vector")
                   for tf_field, torch_field in BN_FIELDS)

    for conv_key, bn_key in (("conv1.0", "conv1.1"), ("conv1.3", "conv1.4"), ("conv1.6", "bn1"),
                             ("maxpool.0", "maxpool.1")):
        conv(conv_key)
        bn(bn_key)
    for stage, blocks in enumerate(layers, start=1):
        for b in range(blocks):
            key = f"layer{stage}.{b}"
            if b == 0:  # timm's avg-pool shortcut is Sequential(pool, conv, bn)
                conv(f"{key}.downsample.1")
                bn(f"{key}.downsample.2")
            for i in (1, 2, 3):
                conv(f"{key}.conv{i}")
                bn(f"{key}.bn{i}")
            conv(f"{key}.se.fc1", bias=True)
            conv(f"{key}.se.fc2", bias=True)
    out.append(Variable("dense/kernel", "fc.weight", "dense"))
    out.append(Variable("dense/bias", "fc.bias", "vector"))
    return out


def to_timm(value: torch.Tensor, layout: str) -> torch.Tensor:
    """TF layout -> PyTorch layout; float tensors become float32."""
    if layout == "conv":
        value = value.permute(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
    elif layout == "dense":
        value = value.t()  # (2048, classes) -> (classes, 2048)
    if value.is_floating_point():
        value = value.to(torch.float32)
    return value.contiguous()


def to_tf(value: torch.Tensor, layout: str) -> torch.Tensor:
    """PyTorch layout -> TF layout (the inverse of :func:`to_timm`)."""
    if layout == "conv":
        return value.permute(2, 3, 1, 0).contiguous()  # (out, in, kh, kw) -> (kh, kw, in, out)
    if layout == "dense":
        return value.t().contiguous()
    return value


def infer_layout(ckpt: TFCheckpoint) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(blocks per stage, bottleneck widths) of a checkpoint, or None when it has no SE blocks.

    Every block has one SE reduce conv (a biased 1x1 conv from 4*width to width channels); taken in
    creation order, a change of width starts a new stage.
    """
    se_reduce = []
    for name in ckpt.names():
        base = name.removesuffix(EMA_SUFFIX)
        found = re.fullmatch(r"conv2d(?:_(\d+))?/kernel", base)
        if not found or (name != base and base in ckpt.entries):
            continue  # not a conv kernel, or an EMA copy whose raw variable is counted
        shape = ckpt.shape(name)
        has_bias = any(f"{base[:-len('kernel')]}bias{s}" in ckpt.entries for s in ("", EMA_SUFFIX))
        if has_bias and len(shape) == 4 and shape[2] == 4 * shape[3]:
            se_reduce.append((int(found.group(1) or 0), shape[3]))
    layers: list[int] = []
    widths: list[int] = []
    for _, width in sorted(se_reduce):
        if not widths or widths[-1] != width:
            layers.append(0)
            widths.append(width)
        layers[-1] += 1
    return (tuple(layers), tuple(widths)) if layers else None


def describe_layout(layout: tuple[tuple[int, ...], tuple[int, ...]] | None) -> str:
    if layout is None:
        return "no ResNet-RS blocks"
    layers, widths = layout
    depth = next((d for d, lay in DEPTH_LAYERS.items() if lay == layers), None) if widths == RS_WIDTHS else None
    text = f"blocks {list(layers)}" + ("" if widths == RS_WIDTHS else f", widths {list(widths)}")
    return text + (f" (ResNet-RS-{depth})" if depth else "")


@dataclass
class Conversion:
    """A converted state dict and what was read to make it."""

    state_dict: dict[str, torch.Tensor]
    consumed: list[str]  # checkpoint names read, each once
    ignored: list[str]  # optimizer slots, global_step, unused raw or EMA copies
    ema: bool
    layers: tuple[int, ...]


def _sort_key(name: str) -> tuple[str, int, str]:
    m = re.match(r"([a-z_]+?)(?:_(\d+))?/(.*)", name)
    return (m.group(1), int(m.group(2) or 0), m.group(3)) if m else (name, 0, "")


def convert_checkpoint(ckpt: TFCheckpoint, layers: tuple[int, ...], *, widths: tuple[int, ...] = RS_WIDTHS,
                       ema: bool | None = None, target: str = "") -> Conversion:
    """Map the variables of ``ckpt`` onto timm's ResNet-RS with ``layers`` blocks per stage
    (``widths``: bottleneck widths per stage, only narrowed in tests).

    ``ema``: None uses the ``ExponentialMovingAverage`` copies when every variable has one (the
    official evaluation uses them), True requires them, False reads the raw variables.
    Any missing, extra or mis-shaped model variable is an error that lists the first ones.
    """
    target = target or describe_layout((tuple(layers), tuple(widths)))
    wanted = official_variables(layers)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_resnet_rs(layers, channels=widths).state_dict().items()}
    present = {n.removesuffix(EMA_SUFFIX) for n in ckpt.entries if MODEL_VARIABLE.fullmatch(n.removesuffix(EMA_SUFFIX))}
    with_ema = {n for n in present if n + EMA_SUFFIX in ckpt.entries}
    wanted_names = {v.tf_name for v in wanted}
    if ema is None:
        ema = bool(with_ema & wanted_names)

    def stored(name: str) -> str:  # the copy read: the EMA one or the raw variable
        return name + EMA_SUFFIX if ema else name

    expected = {v.tf_name: tuple(to_tf(torch.empty(shapes[v.timm_key], device="meta"), v.layout).shape)
                for v in wanted}
    # A variable whose chosen copy (EMA or raw) is absent counts as missing, with its own reason.
    no_copy = {n for n in present & wanted_names if stored(n) not in ckpt.entries}
    found = {n: ckpt.shape(stored(n) if n in wanted_names else (n if n in ckpt.entries else n + EMA_SUFFIX))
             for n in present - no_copy}
    diff = diff_state_dict(found, expected)
    order = {v.tf_name: i for i, v in enumerate(wanted)}  # report in creation order: the first mismatch first
    problems = [text for _, text in sorted(
        [(order[n], f"{stored(n)}: missing ({'EMA copy' if ema else 'raw variable'} of {n})" if n in no_copy
          else f"{n}: missing (expected shape {expected[n]})") for n in diff.missing]
        + [(order[n], f"{stored(n)}: shape {got} in the checkpoint, expected {want}")
           for n, got, want in diff.mismatched])]
    problems += [f"{n}: not part of {target} (shape {found[n]})" for n in sorted(diff.unexpected, key=_sort_key)]
    if problems:
        more = f" … and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise WeightsError(
            f"TensorFlow checkpoint {str(ckpt.prefix)!r} does not match {target}: first mismatching "
            f"variables: {'; '.join(problems[:8])}{more}. The checkpoint has "
            f"{describe_layout(infer_layout(ckpt))}; pick the backbone of that depth, or the checkpoint "
            f"of this one.")
    sd: dict[str, torch.Tensor] = {}
    consumed = []
    for var in wanted:
        sd[var.timm_key] = to_timm(ckpt.read(stored(var.tf_name)), var.layout)
        consumed.append(stored(var.tf_name))
    for key in shapes:  # BN batch counters: a PyTorch-only buffer, unused in eval
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(0, dtype=torch.long)
    ignored = sorted(set(ckpt.entries) - set(consumed))
    return Conversion(sd, consumed, ignored, ema, tuple(layers))


def open_checkpoint(src: Path, workdir: Path) -> TFCheckpoint:
    """A checkpoint from a tarball (unpacked into ``workdir``), a folder, a prefix or its files."""
    src = Path(src).expanduser()
    if not src.exists() and not Path(f"{src}.index").exists():
        raise WeightsError(f"{str(src)!r} does not exist. Pass the official tarball (resnet-rs-DEPTH-iRES.tar.gz), "
                           f"its extracted folder, or the checkpoint's .index file.")
    if src.is_file() and src.name.endswith((".tar.gz", ".tgz", ".tar")):
        return TFCheckpoint(extract_checkpoint_tarball(src, workdir))
    return TFCheckpoint(find_checkpoint_prefix(src))


def convert_resnet_rs_tf(src: Path, *, layers: tuple[int, ...] | None = None,
                         ema: bool | None = None, target: str = "") -> dict[str, torch.Tensor]:
    """Convert the official checkpoint at ``src``; ``layers`` None reads the layout from the checkpoint."""
    with tempfile.TemporaryDirectory(prefix="resnet_rs_tf_") as tmp:
        ckpt = open_checkpoint(src, Path(tmp))
        widths = RS_WIDTHS
        if layers is None:
            layout = infer_layout(ckpt)
            if layout is None:
                raise WeightsError(f"{str(src)!r} holds no ResNet-RS variables (conv2d_N/kernel with SE "
                                   f"biases); is it an official ResNet-RS checkpoint?")
            layers, widths = layout
        return convert_checkpoint(ckpt, layers, widths=widths, ema=ema, target=target).state_dict


def convert_for_backbone(src: Path, *, name: str, depth: int) -> dict[str, torch.Tensor]:
    """Converter of registry entry ``name``: converts on first use, then reuses the cached result.

    The result is cached as safetensors under torch hub's ``checkpoints`` folder, keyed by the
    sha256 of the tarball or ``.index`` file, so later runs skip unpacking and conversion.
    """
    src = Path(src).expanduser()
    key_file = src
    if src.is_dir() or not src.exists():
        key_file = Path(f"{find_checkpoint_prefix(src)}.index")
    cache = Path(torch.hub.get_dir()) / "checkpoints" / f"{name}-tf-{sha256_file(key_file)[:16]}.safetensors"
    if cache.is_file():
        return read_state_dict(cache)
    sd = convert_resnet_rs_tf(src, layers=DEPTH_LAYERS[depth], target=f"backbone {name!r} (ResNet-RS-{depth}, "
                                                                         f"blocks {list(DEPTH_LAYERS[depth])})")
    write_safetensors(sd, cache, metadata={"converter": "resnet_rs_tf", "source": src.name})
    return sd


CONVERTERS.add("resnet_rs_tf", ConverterSpec(
    convert=convert_resnet_rs_tf,
    description="official ResNet-RS TF1 checkpoint (resnet-rs-DEPTH-iRES.tar.gz, its folder or .index "
                "file) -> timm resnetrs* layout; the depth is read from the checkpoint",
    backbones=tuple(entry_name(d, r) for d, r, _ in OFFICIAL_CHECKPOINTS)))
