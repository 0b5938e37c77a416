"""Building registry backbones: from a name (:func:`build_backbone`) or a config section
(:func:`build_backbone_from_config`, what every task adapter uses), and checking weights before any data work
(:func:`check_weights`). Finding, reading and checking the weights themselves is :mod:`transfer.weights`."""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch

from transfer.backbones.contract import Backbone
from transfer.backbones.spec import BACKBONES
from transfer.weights import (
    DEFAULT_MIN_LOADED_FRACTION,
    WeightsInfo,
    keep_for_next_read,
    load_strict,
    read_or_convert,
    resolve_weights_file,
)

if TYPE_CHECKING:  # type only: building a backbone needs no run-config machinery
    from transfer.config import BackboneConfig

log = logging.getLogger(__name__)


def build_backbone(name: str, *, weights: str = "pretrained", strict: bool = True,
                   drop_path_rate: float = 0.0, keep_classifier: bool = False,
                   min_loaded_fraction: float = DEFAULT_MIN_LOADED_FRACTION) -> Backbone:
    """Build registry entry ``name`` with ``weights``: ``pretrained``, ``random`` or a file path.

    ``drop_path_rate`` is timm's stochastic depth (rising per block to this rate). ``keep_classifier=True`` keeps
    the ImageNet head (then required in the weights file), for ImageNet evaluation and for size/latency figures
    comparable with published ones; ``forward`` then gives logits. ``strict=False`` loads the matching tensors
    only, and still raises :class:`WeightsError` unless at least ``min_loaded_fraction`` of the backbone's tensors
    (and at least one) come from the file. What was loaded is logged and kept in ``Backbone.weights.load``
    (:class:`transfer.weights.LoadReport`).
    """
    import timm  # here, not at import: the registry (and config validation) needs no timm

    spec = BACKBONES.get(name)
    # The file first: a missing file or a failed download is refused before the network is built and initialised.
    path, info = (None, WeightsInfo("random")) if weights == "random" else resolve_weights_file(spec, weights)
    model = timm.create_model(spec.arch, pretrained=False, drop_path_rate=drop_path_rate, **spec.arch_kwargs)
    if path is not None:
        sd = read_or_convert(spec, model, path)
        optional = () if keep_classifier else (spec.classifier_prefix,)
        report = load_strict(model, sd, origin=str(path), optional_prefixes=optional, strict=strict,
                             min_loaded_fraction=min_loaded_fraction)
        info = dataclasses.replace(info, load=report)
        incomplete = report.missing or report.unexpected
        (log.warning if incomplete else log.info)("backbone %s weights %s: %s", name, info.source, report.summary())
    if not keep_classifier:
        model.reset_classifier(0)
    return Backbone(spec, model, info)


def build_backbone_from_config(backbone: BackboneConfig, *, keep_classifier: bool = False) -> Backbone:
    """Build the ``backbone`` section of a run config (``transfer.config.BackboneConfig``): its name, weights,
    ``strict``, ``min_loaded_fraction`` and ``drop_path_rate`` reach the model the same way in every task."""
    return build_backbone(backbone.name, weights=backbone.weights, strict=backbone.strict,
                          drop_path_rate=backbone.drop_path_rate, keep_classifier=keep_classifier,
                          min_loaded_fraction=backbone.min_loaded_fraction)


def check_weights(name: str, *, weights: str = "pretrained", strict: bool = True,
                  min_loaded_fraction: float = DEFAULT_MIN_LOADED_FRACTION) -> WeightsInfo:
    """Resolve ``weights`` for backbone ``name`` (download, find the file, convert an official format) and check
    its keys, shapes and values against the architecture, loading nothing: the checks of :func:`build_backbone`,
    done before any data work so that a bad or unreachable file fails first (``python -m transfer.run`` calls it
    before the task starts). The state dict read is kept for the next :func:`build_backbone` of the same file,
    which then does not read it again. Raises :class:`WeightsError`.
    """
    import timm

    spec = BACKBONES.get(name)
    if weights == "random":
        return WeightsInfo("random")
    with torch.device("meta"):  # shapes and names only: no memory, no initialisation work
        model = timm.create_model(spec.arch, pretrained=False, **spec.arch_kwargs)
    path, info = resolve_weights_file(spec, weights)
    sd = read_or_convert(spec, model, path)
    report = load_strict(model, sd, origin=str(path), optional_prefixes=(spec.classifier_prefix,), strict=strict,
                         min_loaded_fraction=min_loaded_fraction, dry_run=True)
    keep_for_next_read(path, sd)
    return dataclasses.replace(info, load=report)
