"""BYOL (DeepMind, JAX/Haiku) checkpoint -> timm ResNet-50.

The release ``pretrain_res50x1.pkl`` is the training checkpoint written by deepmind-research
byol/utils/checkpointing.py: ``dill.dump(dict(experiment_state=..., step=..., rng=...), protocol=2)``,
where ``experiment_state`` is the ``_ByolExperimentState`` NamedTuple of byol/byol_experiment.py
(fields online_params, target_params, online_state, target_state, opt_state) holding Haiku mappings of
numpy arrays (linusericsson/ssl-transfer download_and_prepare_models.py reads
``["experiment_state"].online_params`` / ``.online_state`` from this file).

It is a pickle, and unpickling runs whatever callables the file names. So it is read by
:class:`ArrayUnpickler`, which admits numpy array reconstruction and plain containers and turns the
release's own container classes (Haiku mappings, the NamedTuples) into inert records without importing
anything; any other global (``os.system``, ``builtins.eval``, ...) is refused.

Haiku names (byol/utils/networks.py ``ResNetTorso`` with Haiku's ``BlockGroup``/``BlockV1``):
``<enc>/~/initial_conv`` {w: HWIO}, ``<enc>/~/initial_batchnorm`` {scale, offset}, and
``<enc>/~/block_group_{g}/~/block_{b}/~/{conv_i, batchnorm_i, shortcut_conv, shortcut_batchnorm}``;
the BN moving statistics live in the state under ``<bn>/~/mean_ema`` and ``<bn>/~/var_ema``
(``average``). ``classifier`` is the online linear probe BYOL trains on stopped-gradient features.
"""
from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfer.convert import CONVERTERS, ConverterSpec
from transfer.convert._layout import add_bn_counters, check_layout, stage_depths, timm_layout
from transfer.errors import WeightsError

# Packages whose classes and functions the release pickle names; they become inert records.
RELEASE_PACKAGES = ("byol", "haiku", "optax", "jax", "jaxlib")
EXPERIMENT_STATE_FIELDS = ("online_params", "target_params", "online_state", "target_state", "opt_state")


class Record:
    """Stand-in for a class or function of the release's packages: keeps what the pickle passes, runs nothing."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Record:
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"Record({self.qualname})"


def _numpy_globals() -> dict[tuple[str, str], Any]:
    # The reconstruction functions numpy's own __reduce__ names, looked up from live objects so the
    # table holds whatever module path this numpy version uses; both 1.x (numpy.core) and 2.x
    # (numpy._core) spellings are accepted since the release predates numpy 2.
    reconstruct = np.empty(0).__reduce__()[0]
    scalar = np.float32(0).__reduce__()[0]
    frombuffer = np.empty(0).__reduce_ex__(5)[0]
    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for fn, sub in ((reconstruct, "multiarray"), (scalar, "multiarray"), (frombuffer, "numeric")):
        for base in ("numpy.core", "numpy._core"):
            table[(f"{base}.{sub}", fn.__name__)] = fn
    # Protocol 2 has no bytes opcode: bytes (numpy's raw buffers) are pickled as _codecs.encode(str, 'latin1').
    import _codecs

    table[("_codecs", "encode")] = _codecs.encode
    for module in ("builtins", "__builtin__"):
        table[(module, "set")], table[(module, "frozenset")] = set, frozenset
    from collections import OrderedDict

    table[("collections", "OrderedDict")] = OrderedDict
    return table


class ArrayUnpickler(pickle.Unpickler):
    """Unpickler that admits numpy arrays, plain containers and inert records of the release's classes."""

    _allowed = _numpy_globals()

    def __init__(self, file: io.BufferedIOBase):
        super().__init__(file)
        self._records: dict[str, type[Record]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module.split(".")[0] in RELEASE_PACKAGES:
            qualname = f"{module}.{name}"
            if qualname not in self._records:
                self._records[qualname] = type(name, (Record,), {"qualname": qualname})
            return self._records[qualname]
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def load_release_pickle(path: Path) -> Any:
    """Read a BYOL release pickle without running code from it."""
    if not Path(path).is_file():
        raise WeightsError(f"BYOL checkpoint {str(path)!r} does not exist. Download pretrain_res50x1.pkl "
                           "(see docs/ssl_backbones.md).")
    try:
        with open(path, "rb") as f:
            return ArrayUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise WeightsError(f"refused to load {str(path)!r}: {e}. Only numpy arrays, plain containers and the "
                           f"BYOL release's own container classes are read from this file; anything else "
                           f"could run code. Use the official pretrain_res50x1.pkl.") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise WeightsError(f"{str(path)!r} is not a readable BYOL checkpoint pickle "
                           f"({type(e).__name__}: {e}).") from None


def as_mapping(obj: Any, what: str) -> Mapping:
    """A dict, or a Haiku mapping record (``frozendict``/``FlatMapping`` pickle as ``cls(dict)``)."""
    if isinstance(obj, Mapping):
        return obj
    if isinstance(obj, Record):
        if len(obj.args) == 1 and isinstance(obj.args[0], Mapping):
            return obj.args[0]
        if isinstance(obj.state, Mapping):
            return obj.state
    raise WeightsError(f"BYOL checkpoint: {what} is a {obj!r}, not a mapping of parameters.")


def experiment_state(ckpt: Any) -> tuple[Mapping, Mapping]:
    """(online_params, online_state) of a loaded release pickle."""
    if not isinstance(ckpt, Mapping) or "experiment_state" not in ckpt:
        keys = list(ckpt)[:5] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise WeightsError(f"BYOL checkpoint: expected a dict with 'experiment_state', got {keys}.")
    state = ckpt["experiment_state"]
    fields = state.args if isinstance(state, Record) else state
    if isinstance(fields, Mapping):
        fields = tuple(fields.get(f) for f in EXPERIMENT_STATE_FIELDS)
    if not isinstance(fields, tuple) or len(fields) != len(EXPERIMENT_STATE_FIELDS):
        raise WeightsError(f"BYOL checkpoint: experiment_state is {state!r}, not the 5-field "
                           f"_ByolExperimentState {EXPERIMENT_STATE_FIELDS}.")
    named = dict(zip(EXPERIMENT_STATE_FIELDS, fields))
    return as_mapping(named["online_params"], "online_params"), as_mapping(named["online_state"], "online_state")


def _haiku_modules(depths: tuple[int, ...]) -> list[tuple[str, str, str]]:
    """(timm module, Haiku module below the encoder, kind) for every conv and BN of the encoder."""
    modules = [("conv1", "initial_conv", "conv"), ("bn1", "initial_batchnorm", "bn")]
    for g, blocks in enumerate(depths):
        for b in range(blocks):
            hk, pt = f"block_group_{g}/~/block_{b}/~/", f"layer{g + 1}.{b}."
            for i in range(3):
                modules += [(f"{pt}conv{i + 1}", f"{hk}conv_{i}", "conv"),
                            (f"{pt}bn{i + 1}", f"{hk}batchnorm_{i}", "bn")]
            if b == 0:
                modules += [(f"{pt}downsample.0", f"{hk}shortcut_conv", "conv"),
                            (f"{pt}downsample.1", f"{hk}shortcut_batchnorm", "bn")]
    return modules


def byol_to_timm(params: Mapping, state: Mapping, *, arch: str = "resnet50",
                 origin: str = "BYOL checkpoint") -> dict[str, torch.Tensor]:
    """Map Haiku ``online_params``/``online_state`` of BYOL's ResNet to a timm ``arch`` state dict."""
    stems = [k for k in params if k == "initial_conv" or k.endswith("/~/initial_conv")]
    if len(stems) != 1:
        raise WeightsError(f"{origin}: expected one encoder 'initial_conv' module among the parameters, found "
                           f"{stems or 'none'} (modules: {list(params)[:5]} …).")
    enc = stems[0][: -len("initial_conv")]  # e.g. "res_net50/~/"
    layout = timm_layout(arch)

    def tensor(mapping: Mapping, module: str, field: str) -> torch.Tensor:
        entry = mapping.get(module)
        entry = as_mapping(entry, module) if entry is not None else None
        if entry is None or field not in entry:
            raise WeightsError(f"{origin}: {module!r}/{field} is missing; the file is not a BYOL ResNet-50 "
                               f"checkpoint, or a different depth.")
        return torch.as_tensor(np.asarray(entry[field])).float()

    sd: dict[str, torch.Tensor] = {}
    used = set()
    for pt, hk, kind in _haiku_modules(stage_depths(layout)):
        name = enc + hk
        used.add(name)
        if kind == "conv":
            sd[f"{pt}.weight"] = tensor(params, name, "w").permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
        else:  # Haiku keeps BN parameters and statistics broadcastable, (1, 1, 1, C); flatten to (C,)
            sd[f"{pt}.weight"] = tensor(params, name, "scale").reshape(-1)
            sd[f"{pt}.bias"] = tensor(params, name, "offset").reshape(-1)
            sd[f"{pt}.running_mean"] = tensor(state, f"{name}/~/mean_ema", "average").reshape(-1)
            sd[f"{pt}.running_var"] = tensor(state, f"{name}/~/var_ema", "average").reshape(-1)
    extra = [k for k in params if k.startswith(enc) and k not in used]
    if extra:
        raise WeightsError(f"{origin}: encoder modules with no place in {arch}: {extra[:5]}. The checkpoint is "
                           f"deeper or wider than ResNet-50 1x; use a matching backbone.")
    if "classifier" in params:
        sd["fc.weight"] = tensor(params, "classifier", "w").t().contiguous()  # (in, out) -> (out, in)
        sd["fc.bias"] = tensor(params, "classifier", "b")
    add_bn_counters(sd, layout)
    return check_layout(sd, layout, origin=origin)


def convert_byol(path: Path) -> dict[str, torch.Tensor]:
    """BYOL ``pretrain_res50x1.pkl`` -> timm ResNet-50 state dict (online network, online classifier as fc)."""
    params, state = experiment_state(load_release_pickle(path))
    return byol_to_timm(params, state, origin=str(path))


CONVERTERS.add("byol", ConverterSpec(convert_byol, "BYOL JAX/Haiku checkpoint (pretrain_res50x1.pkl), read "
                                     "without running pickled code", backbones=("byol_r50",)))
