"""The backbone registry: every pretrained network the suite transfers, behind one contract.

``build_backbone(name, weights=...)`` returns a :class:`Backbone`: ``forward`` gives the pooled
embedding ``(B, num_features)``, ``forward_features`` the multi-scale maps, one per stage, whose
channels and strides are ``feature_info``. Entries are registered in the modules imported at the
bottom of this file.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from transfer.errors import WeightsError
from transfer.io import sha256_file
from transfer.registry import Registry
from transfer.weights import (
    DEFAULT_MIN_LOADED_FRACTION,
    WeightsInfo,
    is_state_dict_file,
    load_strict,
    read_state_dict,
    strip_wrapper_prefixes,
)

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Channels and strides of the five feature levels (stem, res2..res5) of a bottleneck ResNet.
BOTTLENECK_CHANNELS = (64, 256, 512, 1024, 2048)
RESNET_STRIDES = (2, 4, 8, 16, 32)

Converter = Callable[[Path], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class BackboneSpec:
    """What a registry entry declares: architecture, weights, resolutions, normalisation, features.

    ``hub_id`` is a Hugging Face Hub repository holding ``model.safetensors`` in timm's layout;
    ``url`` a direct download; ``convert`` turns a downloaded or local file that is not a state
    dict in timm's layout (an official release format) into one. ``download_hint`` tells users where
    weights come from when there is no automatic source.
    """

    name: str
    arch: str  # timm architecture name
    family: str  # resnet_rs | resnet | resnet_d | ssl
    train_res: int
    test_res: int
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    feature_channels: tuple[int, ...] = BOTTLENECK_CHANNELS
    feature_strides: tuple[int, ...] = RESNET_STRIDES
    hub_id: str | None = None
    url: str | None = None
    convert: Converter | None = None
    download_hint: str = ""
    top1: float | None = None  # published ImageNet top-1 of these weights
    source: str = ""  # where the facts of this entry come from
    # The published checkpoint these weights are (e.g. "resnet-rs-152-i256"), as baselines.csv names it in a
    # row's checkpoint condition; "" when the entry is not one of those.
    checkpoint: str = ""
    classifier_prefix: str = "fc."
    arch_kwargs: dict = field(default_factory=dict)

    def data_config(self, *, train: bool = False, resolution: int | None = None) -> dict:
        """timm data config (``timm.data.create_transform`` keywords) of these weights."""
        res = resolution or (self.train_res if train else self.test_res)
        return {"input_size": (3, res, res), "interpolation": self.interpolation, "mean": self.mean,
                "std": self.std, "crop_pct": self.crop_pct, "crop_mode": "center"}


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES.add(spec.name, spec)
    return spec


@dataclass(frozen=True)
class FeatureLevel:
    channels: int
    stride: int


class Backbone(nn.Module):
    """A registry backbone, with its ImageNet classifier removed unless built with ``keep_classifier``."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights: WeightsInfo):
        super().__init__()
        self.spec = spec
        self.model = model
        self.weights = weights
        self.num_features: int = model.num_features
        self.feature_info = [FeatureLevel(i["num_chs"], i["reduction"]) for i in model.feature_info]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding: (B, 3, H, W) -> (B, num_features)."""
        return self.model(x)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of every level: (B, 3, H, W) -> [(B, C_i, H/s_i, W/s_i)]."""
        return self.model.forward_intermediates(x, intermediates_only=True)

    def data_config(self, *, train: bool = False, resolution: int | None = None) -> dict:
        return self.spec.data_config(train=train, resolution=resolution)


def build_backbone(name: str, *, weights: str = "pretrained", strict: bool = True,
                   drop_path_rate: float = 0.0, keep_classifier: bool = False,
                   min_loaded_fraction: float = DEFAULT_MIN_LOADED_FRACTION) -> Backbone:
    """Build registry entry ``name`` with ``weights``: ``pretrained``, ``random`` or a file path.

    ``keep_classifier=True`` keeps the ImageNet head (then required in the weights file), for ImageNet
    evaluation and for size/latency figures comparable with published ones; ``forward`` then gives logits.
    ``strict=False`` loads the matching tensors only, and still raises :class:`WeightsError` unless at least
    ``min_loaded_fraction`` of the backbone's tensors (and at least one) come from the file. What was loaded
    is logged and kept in ``Backbone.weights.load`` (:class:`transfer.weights.LoadReport`).
    """
    spec = BACKBONES.get(name)
    model = timm.create_model(spec.arch, pretrained=False, drop_path_rate=drop_path_rate, **spec.arch_kwargs)
    if weights == "random":
        info = WeightsInfo("random")
    else:
        path, info = _resolve_weights_file(spec, weights)
        sd = _read_or_convert(spec, model, path)
        optional = () if keep_classifier else (spec.classifier_prefix,)
        report = load_strict(model, sd, origin=str(path), optional_prefixes=optional, strict=strict,
                             min_loaded_fraction=min_loaded_fraction)
        info = dataclasses.replace(info, load=report)
        incomplete = report.missing or report.unexpected
        (log.warning if incomplete else log.info)("backbone %s weights %s: %s", name, info.source, report.summary())
    if not keep_classifier:
        model.reset_classifier(0)
    return Backbone(spec, model, info)


def check_weights(name: str, *, weights: str = "pretrained", strict: bool = True,
                  min_loaded_fraction: float = DEFAULT_MIN_LOADED_FRACTION) -> WeightsInfo:
    """Resolve ``weights`` for backbone ``name`` (download, find the file, convert an official format) and check
    its keys, shapes and values against the architecture, loading nothing: the checks of :func:`build_backbone`,
    done before any data work so that a bad or unreachable file fails first (``python -m transfer.run`` calls it
    before the task starts). The state dict read is kept for the next :func:`build_backbone` of the same file,
    which then does not read it again. Raises :class:`WeightsError`.
    """
    spec = BACKBONES.get(name)
    if weights == "random":
        return WeightsInfo("random")
    with torch.device("meta"):  # shapes and names only: no memory, no initialisation work
        model = timm.create_model(spec.arch, pretrained=False, **spec.arch_kwargs)
    path, info = _resolve_weights_file(spec, weights)
    sd = _read_or_convert(spec, model, path)
    report = load_strict(model, sd, origin=str(path), optional_prefixes=(spec.classifier_prefix,), strict=strict,
                         min_loaded_fraction=min_loaded_fraction, dry_run=True)
    _READ.clear()
    _READ[_file_key(path)] = sd
    return dataclasses.replace(info, load=report)


# The state dict :func:`check_weights` read last, by (path, size, mtime): handed to the build that follows.
_READ: dict[tuple, dict[str, torch.Tensor]] = {}


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _read_or_convert(spec: BackboneSpec, model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """A timm-layout state dict from ``path``; an official release format is converted on first use."""
    if _READ and path.exists() and _file_key(path) in _READ:
        return _READ.pop(_file_key(path))
    if spec.convert is None:
        if not (is_state_dict_file(path) and path.is_file()):
            raise WeightsError(f"backbone.weights={str(path)!r}: not a weights file. Pass a .safetensors, "
                               f".pth or .bin state dict in timm's key layout.")
        return read_state_dict(path)
    if is_state_dict_file(path) and path.is_file():
        try:
            sd = read_state_dict(path)
        except WeightsError:
            sd = None  # not a torch file after all (an official .tar): the converter decides
        if sd is not None and not _looks_foreign(model, sd):
            return sd
    return spec.convert(path)


def _looks_foreign(model: nn.Module, sd: dict) -> bool:
    """True when a state dict shares no key with the model, even without wrapper prefixes: an official
    release layout to convert."""
    own = model.state_dict()
    stripped, _ = strip_wrapper_prefixes(sd, own)
    return not set(stripped) & set(own)


def _resolve_weights_file(spec: BackboneSpec, weights: str) -> tuple[Path, WeightsInfo]:
    if weights != "pretrained":
        path = Path(os.path.expanduser(weights))
        if not path.exists():
            raise WeightsError(
                f"backbone.weights={weights!r}: no such file. Pass backbone.weights=pretrained, "
                f"backbone.weights=random, or the path of an existing weights file for {spec.name!r}.")
        digest = sha256_file(path) if path.is_file() else None  # a folder: an extracted official checkpoint
        return path, WeightsInfo(f"file:{path}", str(path), digest)
    if spec.hub_id:
        path = _download_hub(spec)
        return path, WeightsInfo(f"hub:{spec.hub_id}", str(path), sha256_file(path))
    if spec.url:
        path = _download_url(spec)
        return path, WeightsInfo(f"url:{spec.url}", str(path), sha256_file(path))
    raise WeightsError(f"backbone {spec.name!r} has no automatic weight source. {spec.download_hint} "
                       f"Then run with backbone={spec.name} backbone.weights=/path/to/file.")


def _offline_message(spec: BackboneSpec, where: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"could not download the pretrained weights of backbone {spec.name!r} from {where} "
            f"({type(err).__name__}: {first[:200]}). Without network access, fetch the file on a "
            f"machine that has it and pass it as backbone.weights=/path/to/model.safetensors "
            f"(.safetensors, or .pth/.bin state dict in timm's key layout), or run with "
            f"backbone.weights=random. {spec.download_hint}").strip()


def _check_reachable(url: str, timeout: float = 10.0) -> None:
    """Fail at once when the host of ``url`` has no address or refuses or drops a connection (and no proxy is
    set), instead of after the download client's retries: the Hub client retries five times with back-off,
    printing two lines each time, before its own error."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:  # socket.gaierror (no address), refused, unreachable, timed out
        raise ConnectionError(f"cannot reach {host}:{port} ({e})") from None


def _download_hub(spec: BackboneSpec) -> Path:
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError

    cached = try_to_load_from_cache(spec.hub_id, "model.safetensors")
    if isinstance(cached, str):
        return Path(cached)
    try:
        if not constants.HF_HUB_OFFLINE:
            _check_reachable(constants.ENDPOINT)
        try:
            return Path(hf_hub_download(spec.hub_id, "model.safetensors"))
        except RemoteEntryNotFoundError:
            return Path(hf_hub_download(spec.hub_id, "pytorch_model.bin"))
    except Exception as e:  # noqa: BLE001 - any hub failure becomes the same actionable message
        raise WeightsError(_offline_message(spec, f"the Hugging Face Hub repository {spec.hub_id!r}", e)) from None


def _download_url(spec: BackboneSpec) -> Path:
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    target = cache / Path(urlparse(spec.url).path).name
    if not target.exists():
        try:
            _check_reachable(spec.url)
            cache.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(spec.url, str(target), progress=True)
        except Exception as e:  # noqa: BLE001 - network failures take many forms
            raise WeightsError(_offline_message(spec, spec.url, e)) from None
    return target


# Entries: importing these modules registers them.
from transfer.backbones import resnet_rs_tf, resnets, ssl  # noqa: E402,F401,I001
