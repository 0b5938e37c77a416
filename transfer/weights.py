"""Finding, reading, checking and writing backbone weights.

Finding (:func:`resolve_weights_file`, :func:`read_or_convert`): ``backbone.weights`` is ``pretrained``
(downloaded from the entry's Hub repository or URL into the usual caches), or a file; an official release format
is converted on first use.
Every file is read by one reader (:func:`read_state_dict`), without running pickled code: safetensors first,
other files through ``torch.load(..., weights_only=True)`` (:func:`read_torch_file`). One diff
(:func:`diff_state_dict`) computes and words the missing, unexpected and mis-shaped keys, for the loader and
for the converters of ``transfer/convert``.

Loading (:func:`load_strict`) recognises the key prefixes that training wrappers add — ``module.`` (DDP,
DataParallel), ``_orig_mod.`` (``torch.compile``), ``model.``, ``backbone.``, ``encoder.`` (Lightning modules
and self-supervised frameworks), in any nesting such as ``module._orig_mod.`` — by choosing the chain
under which the most keys match the model. It refuses NaN/Inf tensors, and returns a :class:`LoadReport`:
how many of the backbone's tensors were loaded, missing, unexpected. A non-strict load that loaded none of
them, or less than ``min_loaded_fraction``, is refused.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from transfer.errors import WeightsError
from transfer.io import atomic_path, sha256_file

if TYPE_CHECKING:  # type only: transfer.backbones imports this module
    from transfer.backbones.spec import BackboneSpec

log = logging.getLogger(__name__)

STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".tar")
WRAPPER_KEYS = ("state_dict", "model")
# Key prefixes added by training wrappers: DDP / DataParallel, torch.compile, Lightning and SSL frameworks.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")
# BatchNorm's step counters: not weights (they only matter with momentum=None), so not counted as backbone tensors.
COUNTERS_SUFFIX = "num_batches_tracked"
DEFAULT_MIN_LOADED_FRACTION = 0.9


@dataclass(frozen=True)
class LoadReport:
    """What a load took from the file, counted over the backbone's tensors (its state-dict entries, without
    the classifier when that is dropped and without BatchNorm's ``num_batches_tracked`` counters)."""

    strict: bool
    expected: int  # backbone tensors of the model
    loaded: int  # of those, taken from the file
    missing: int  # of those, absent from the file (left at their initial values)
    unexpected: int  # file tensors the model has no place for
    prefix_removed: str  # the wrapper prefix chain stripped from the file's keys ("" for none)
    dropped: int = 0  # file tensors of the classifier dropped for transfer, never compared or loaded

    @property
    def fraction(self) -> float:
        return self.loaded / self.expected if self.expected else 1.0

    def summary(self) -> str:
        removed = f", prefix {self.prefix_removed!r} removed" if self.prefix_removed else ""
        dropped = f", {self.dropped} classifier tensors dropped" if self.dropped else ""
        return (f"loaded {self.loaded} of {self.expected} backbone tensors ({self.missing} missing, "
                f"{self.unexpected} unexpected{removed}{dropped}; {'strict' if self.strict else 'non-strict'})")


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from: ``random``, ``hub:<id>``, ``url:<url>`` or ``file:<path>``;
    ``load`` says what was loaded from it (None for random weights)."""

    source: str
    path: str | None = None
    sha256: str | None = None
    load: LoadReport | None = None

    def as_dict(self) -> dict:
        return {"source": self.source, "path": self.path, "sha256": self.sha256,
                "load": asdict(self.load) if self.load else None}


def is_state_dict_file(path: str | os.PathLike) -> bool:
    return str(path).endswith(STATE_DICT_SUFFIXES)


def read_torch_file(path: str | os.PathLike) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers, never code.

    Raises :class:`WeightsError` naming the file when it is missing, holds pickled objects other than tensors and
    containers, or is not a readable PyTorch file.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"refused to load {str(path)!r}: it holds pickled objects other than tensors and plain "
            f"containers, and loading it could run code ({str(e).splitlines()[0]}). Re-save only the "
            "state dict (torch.save(model.state_dict(), ...)) or convert it to .safetensors."
        ) from None
    except (RuntimeError, OSError, EOFError) as e:
        raise WeightsError(f"weights file {str(path)!r} could not be read as a PyTorch file: {e}") from None


def read_state_dict(path: str | os.PathLike, *, missing_fix: str = "") -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a tensor-only ``.pth``/``.bin`` file: the one reader of weights
    files, for backbones and converters alike.

    A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped (:func:`unwrap_state_dict`); key prefixes
    (``module.`` …) are left for :func:`load_strict`, which knows the model's keys. Raises :class:`WeightsError`
    naming the file; ``missing_fix`` is the advice when it does not exist (default: pass ``backbone.weights``).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist. " + (missing_fix or (
            f"Pass an existing {'/'.join(STATE_DICT_SUFFIXES)} file as backbone.weights=/path/to/file.")))
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"weights file {str(path)!r} is not a readable safetensors file: {e}") from None
    else:
        sd = read_torch_file(path)
    return unwrap_state_dict(sd, origin=str(path))


def unwrap_state_dict(obj: object, *, origin: str) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` mapping in ``obj``, unwrapped from up to two :data:`WRAPPER_KEYS` levels
    (``{"state_dict": {"model": ...}}``). Raises :class:`WeightsError` naming ``origin`` when there is none or
    when it holds entries that are not tensors."""
    for _ in range(2):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        found = f"its keys: {list(obj)[:8]}" if isinstance(obj, Mapping) else f"it holds a {type(obj).__name__}"
        raise WeightsError(f"{origin!r} holds no state dict (expected a mapping of names to tensors, "
                           f"optionally under one of the keys {WRAPPER_KEYS}; {found}).")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(sd) != len(obj):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
        raise WeightsError(f"{origin!r}: entries that are not tensors: {bad}")
    return sd


def strip_wrapper_prefixes(sd: Mapping[str, torch.Tensor], model_keys) -> tuple[dict[str, torch.Tensor], str]:
    """``sd`` with the chain of :data:`WRAPPER_PREFIXES` under which most keys match ``model_keys`` removed.

    Returns (state dict, the chain removed, "" when none helps). Keys outside the chain are kept as they are
    (a projection head: unexpected); on a clash the stripped key wins.
    """
    own = set(model_keys)
    chains = {""}
    for key in sd:
        chain, rest = "", key
        while (p := next((p for p in WRAPPER_PREFIXES if rest.startswith(p)), None)) is not None:
            chain, rest = chain + p, rest[len(p):]
            chains.add(chain)

    def matches(chain: str) -> int:
        return sum(1 for k in sd if k.startswith(chain) and k[len(chain):] in own)

    best = max(sorted(chains, key=len), key=matches)  # ties: the shortest chain, "" first
    if not best:
        return dict(sd), ""
    out = {k[len(best):]: v for k, v in sd.items() if k.startswith(best)}
    out.update({k: v for k, v in sd.items() if not k.startswith(best) and k not in out})
    return out, best


def non_finite(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``sd`` holding NaN or Inf."""
    return [k for k, v in sd.items() if v.is_floating_point() and not _all_finite(v)]


def _all_finite(v: torch.Tensor) -> bool:
    """Whether every element of ``v`` is finite. A finite sum proves it (a NaN or an Inf makes the sum NaN or Inf)
    and costs a fraction of the element-wise test, which runs only when the sum is not finite (then a NaN, an Inf
    or an overflow of the sum). bench/bench_weights.py measures both."""
    return bool(torch.isfinite(v.sum())) or bool(torch.isfinite(v).all())


@dataclass(frozen=True)
class StateDictDiff:
    """How a state dict differs from the keys and shapes it should have (:func:`diff_state_dict`)."""

    missing: tuple[str, ...]  # expected keys absent from the state dict
    unexpected: tuple[str, ...]  # state-dict keys with no expected counterpart
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (key, found shape, expected shape)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self, *, found: str = "file", expected: str = "model", n: int = 10) -> str:
        """``missing (2): a, b; unexpected (1): c; shape mismatch (1): d: file (3,) vs model (4,)``: the first
        ``n`` keys of each kind, with how many more there are; ``found``/``expected`` name the two sides."""
        shapes = [f"{k}: {found} {a} vs {expected} {b}" for k, a, b in self.mismatched]
        return "; ".join(f"{label} ({len(keys)}): {_some(list(keys), n)}"
                         for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                                             ("shape mismatch", shapes)) if keys)


def diff_state_dict(found: Mapping[str, torch.Tensor | tuple[int, ...]],
                    expected: Mapping[str, torch.Tensor | tuple[int, ...]], *,
                    optional_prefixes: tuple[str, ...] = ()) -> StateDictDiff:
    """Compare ``found`` with ``expected`` (each key -> tensor or shape): the one diff used by the loader
    (:func:`load_strict`) and by the converters. Expected keys under ``optional_prefixes`` may be absent;
    missing and mis-shaped keys come in ``expected``'s order, unexpected ones in ``found``'s."""
    missing = tuple(k for k in expected if k not in found and not k.startswith(optional_prefixes))
    unexpected = tuple(k for k in found if k not in expected)
    mismatched = tuple((k, _shape(found[k]), _shape(v)) for k, v in expected.items()
                       if k in found and _shape(found[k]) != _shape(v))
    return StateDictDiff(missing, unexpected, mismatched)


def _shape(value: torch.Tensor | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def write_safetensors(sd: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> str:
    """Write ``sd`` atomically as safetensors; return the file's sha256."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
        _sort_metadata(tmp)
    return sha256_file(path)


def _sort_metadata(path: Path) -> None:
    """Put the ``__metadata__`` entries of a safetensors header in sorted order, in place.

    safetensors writes them in the order of a Rust ``HashMap``, which differs from one write to the next: the
    same tensors and metadata would give files with different sha256 (final weights of a resumed run, a
    re-converted checkpoint). Sorting changes no byte count, so the header keeps its length and alignment.
    """
    import json

    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size).decode("utf-8")
        meta = json.loads(raw).get("__metadata__") or {}
        if len(meta) < 2:
            return
        for order in _orders_in(raw, meta):
            old = '"__metadata__":' + json.dumps(order, separators=(",", ":"), ensure_ascii=False)
            if old in raw:
                new = '"__metadata__":' + json.dumps(dict(sorted(meta.items())), separators=(",", ":"),
                                                     ensure_ascii=False)
                f.seek(8)
                f.write(raw.replace(old, new, 1).encode("utf-8"))
                return


def _orders_in(raw: str, meta: dict) -> list[dict]:
    """``meta`` with its keys in the order they appear in ``raw`` (JSON keys are quoted, so unambiguous)."""
    import json

    positions = {k: raw.find(json.dumps(k, ensure_ascii=False) + ":") for k in meta}
    return [{k: meta[k] for k in sorted(meta, key=positions.__getitem__)}]


def load_strict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], *, origin: str,
                optional_prefixes: tuple[str, ...] = (), strict: bool = True,
                min_loaded_fraction: float = DEFAULT_MIN_LOADED_FRACTION, dry_run: bool = False) -> LoadReport:
    """Load ``sd`` into ``model`` and report what was loaded.

    Wrapper prefixes are removed first (:func:`strip_wrapper_prefixes`). Keys under ``optional_prefixes``
    (the ImageNet classifier, which transfer never uses) are then dropped from the file before anything is
    compared: a fine-tuned checkpoint's head of another shape, or NaN in it, does not matter; they are counted
    as ``dropped`` and may be absent. Raises :class:`WeightsError` for
    mis-shaped keys; for NaN/Inf tensors (naming them); when ``strict`` and keys are missing or unexpected
    (listing them, with a hint when one other key prefix explains the mismatch); and, when not ``strict``, when
    it would load none of the backbone's tensors or fewer than ``min_loaded_fraction`` of them. ``dry_run``
    checks all that and loads nothing (``model`` may then live on the ``meta`` device).
    """
    own = model.state_dict()
    sd, prefix = strip_wrapper_prefixes(sd, own)
    dropped = {k for k in sd if optional_prefixes and k.startswith(optional_prefixes)}
    sd = {k: v for k, v in sd.items() if k not in dropped}
    diff = diff_state_dict(sd, own, optional_prefixes=optional_prefixes)
    missing, unexpected = list(diff.missing), list(diff.unexpected)
    if strict and (missing or unexpected) or diff.mismatched:
        # backbone.strict=false skips missing and unexpected keys, never a tensor of the wrong shape: offered
        # only when it would let the load through.
        fix = (" Check that the file belongs to this backbone (timm key layout)." if diff.mismatched else
               " Check that the file belongs to this backbone (timm key layout), or pass backbone.strict=false to "
               "load the matching keys only (a non-strict load must still cover backbone.min_loaded_fraction of "
               "the backbone).")
        raise WeightsError(f"weights from {origin!r} do not match the model: {diff.describe()}."
                           + prefix_hint(missing, unexpected) + fix)
    taken = {k: v for k, v in sd.items() if k in own}
    broken = non_finite(taken)
    if broken:
        raise WeightsError(f"weights from {origin!r} hold NaN or Inf values in {len(broken)} tensor(s): "
                           f"{_some(broken)}. The checkpoint is damaged (a diverged run or a bad conversion); "
                           "use another checkpoint.")
    counted = [k for k in own if not k.startswith(optional_prefixes) and not k.endswith(COUNTERS_SUFFIX)]
    loaded = sum(1 for k in counted if k in taken)
    report = LoadReport(strict=strict, expected=len(counted), loaded=loaded, missing=len(counted) - loaded,
                        unexpected=len(unexpected), prefix_removed=prefix, dropped=len(dropped))
    if not strict and (loaded == 0 or report.fraction < min_loaded_fraction):
        fix = ("Nothing matched, so the run would use random weights: use weights that belong to this backbone "
               "or convert them (python -m transfer.convert)." if not loaded else
               "Use weights that belong to this backbone, or, to accept a partial load on purpose, lower "
               "backbone.min_loaded_fraction.")
        file_keys = [k for k in sd if not k.endswith(COUNTERS_SUFFIX)]
        raise WeightsError(
            f"weights from {origin!r}: a non-strict load would take only {loaded} of the backbone's "
            f"{len(counted)} tensors ({100 * report.fraction:.1f} %; backbone.min_loaded_fraction="
            f"{min_loaded_fraction}), leaving the rest at their random initialisation. File keys look like "
            f"{_some(file_keys, 3)}; the model's like {_some(counted, 3)} (wrapper prefixes recognised: "
            f"{', '.join(WRAPPER_PREFIXES)}).{prefix_hint(missing, unexpected)} {fix}")
    if not dry_run:
        model.load_state_dict(taken, strict=False)
    return report


def prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """A sentence when most ``missing`` model keys are in the file under one prefix that is not a recognised
    wrapper (``student.``, ``net.``, ``encoder_q.``), with how to remove it; "" otherwise."""
    wanted = set(missing)
    found: dict[str, list[tuple[str, str]]] = {}
    for key in unexpected:
        parts = key.split(".")
        for i in range(1, len(parts)):
            rest = ".".join(parts[i:])
            if rest in wanted:
                found.setdefault(".".join(parts[:i]) + ".", []).append((key, rest))
                break
    if not found:
        return ""
    prefix, pairs = max(found.items(), key=lambda kv: len(kv[1]))
    if len(pairs) < max(1, len(missing) // 2):
        return ""
    file_key, model_key = next((pair for pair in pairs if not pair[1].endswith(COUNTERS_SUFFIX)), pairs[0])
    return (f" Hint: {len(pairs)} of the {len(missing)} missing keys are in the file under the prefix {prefix!r} "
            f"({file_key!r} is the model's {model_key!r}), which is not one of the wrapper prefixes removed "
            f"automatically ({', '.join(WRAPPER_PREFIXES)}). If those are the backbone's weights, re-save them "
            f"without it: sd = {{k[{len(prefix)}:]: v for k, v in sd.items() if k.startswith({prefix!r})}}, "
            "then safetensors.torch.save_file(sd, 'backbone.safetensors').")


def _some(keys: list[str], n: int = 10) -> str:
    more = f" … and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ---------------------------------------------------------------- finding the file of a registry entry

def resolve_weights_file(spec: BackboneSpec, weights: str) -> tuple[Path, WeightsInfo]:
    """The file (or extracted official folder) behind ``backbone.weights`` for registry entry ``spec``, and where
    it came from: ``pretrained`` downloads from the entry's Hub repository or URL (or finds it in the cache), any
    other value is a path. Raises :class:`WeightsError` when there is no such file or no automatic source, or the
    download fails (with how to pass a local file instead)."""
    if weights != "pretrained":
        path = Path(os.path.expanduser(weights))
        if not path.exists():
            raise WeightsError(
                f"backbone.weights={weights!r}: no such file. Pass backbone.weights=pretrained, "
                f"backbone.weights=random, or the path of an existing weights file for {spec.name!r}.")
        digest = sha256_file(path) if path.is_file() else None  # a folder: an extracted official checkpoint
        return path, WeightsInfo(f"file:{path}", str(path), digest)
    if spec.hub_id:
        path = download_hub(spec)
        return path, WeightsInfo(f"hub:{spec.hub_id}", str(path), sha256_file(path))
    if spec.url:
        path = download_url(spec)
        return path, WeightsInfo(f"url:{spec.url}", str(path), sha256_file(path))
    raise WeightsError(f"backbone {spec.name!r} has no automatic weight source. {spec.download_hint} "
                       f"Then run with backbone={spec.name} backbone.weights=/path/to/file.")


# The state dict a weights check read last, by (path, size, mtime): handed to the build that follows
# (:func:`keep_for_next_read`), so a file checked before the data work is not read twice.
_READ: dict[tuple, dict[str, torch.Tensor]] = {}


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def keep_for_next_read(path: Path, sd: dict[str, torch.Tensor]) -> None:
    """Hold ``sd``, read from ``path``, for the next :func:`read_or_convert` of the same unchanged file (one
    state dict at most is held)."""
    _READ.clear()
    _READ[_file_key(path)] = sd


def read_or_convert(spec: BackboneSpec, model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """A timm-layout state dict for ``model`` from ``path``; an official release format is converted on first use
    by the entry's ``convert`` (which keeps its own cache of the result). Raises :class:`WeightsError`."""
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


def _looks_foreign(model: torch.nn.Module, sd: dict) -> bool:
    """True when a state dict shares no key with the model, even without wrapper prefixes: an official
    release layout to convert."""
    own = model.state_dict()
    stripped, _ = strip_wrapper_prefixes(sd, own)
    return not set(stripped) & set(own)


def offline_message(spec: BackboneSpec, where: str, err: Exception) -> str:
    """The error of a failed download of ``spec``'s weights from ``where``: what failed and how to pass a file."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"could not download the pretrained weights of backbone {spec.name!r} from {where} "
            f"({type(err).__name__}: {first[:200]}). Without network access, fetch the file on a "
            f"machine that has it and pass it as backbone.weights=/path/to/model.safetensors "
            f"(.safetensors, or .pth/.bin state dict in timm's key layout), or run with "
            f"backbone.weights=random. {spec.download_hint}").strip()


def check_reachable(url: str, timeout: float = 10.0) -> None:
    """Fail at once when the host of ``url`` has no address or refuses or drops a connection (and no proxy is
    set), instead of after the download client's retries: the Hub client retries five times with back-off,
    printing two lines each time, before its own error. Raises ``ConnectionError``."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:  # socket.gaierror (no address), refused, unreachable, timed out
        raise ConnectionError(f"cannot reach {host}:{port} ({e})") from None


def download_hub(spec: BackboneSpec) -> Path:
    """``model.safetensors`` (else ``pytorch_model.bin``) of ``spec.hub_id``, from the Hub cache or downloaded."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError

    cached = try_to_load_from_cache(spec.hub_id, "model.safetensors")
    if isinstance(cached, str):
        return Path(cached)
    try:
        if not constants.HF_HUB_OFFLINE:
            check_reachable(constants.ENDPOINT)
        try:
            return Path(hf_hub_download(spec.hub_id, "model.safetensors"))
        except RemoteEntryNotFoundError:
            return Path(hf_hub_download(spec.hub_id, "pytorch_model.bin"))
    except Exception as e:  # noqa: BLE001 - any hub failure becomes the same actionable message
        raise WeightsError(offline_message(spec, f"the Hugging Face Hub repository {spec.hub_id!r}", e)) from None


def download_url(spec: BackboneSpec) -> Path:
    """The file at ``spec.url``, from torch hub's ``checkpoints`` cache or downloaded into it (with progress)."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    target = cache / Path(urlparse(spec.url).path).name
    if not target.exists():
        try:
            check_reachable(spec.url)
            cache.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(spec.url, str(target), progress=True)
        except Exception as e:  # noqa: BLE001 - network failures take many forms
            raise WeightsError(offline_message(spec, spec.url, e)) from None
    return target
