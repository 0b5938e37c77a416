"""Typed run configuration: Hydra composes ``recipes/``; this module checks the result completely.

Config flows one way: ``compose`` -> ``validate`` -> a :class:`RunConfig` that is written to the run
directory and handed down, each part getting only its own section.

One source of truth for every value (:func:`register_recipes`): the schemas below and the task adapters' are
registered in Hydra's ConfigStore, with their defaults. ``backbone/<name>`` is generated for every registry entry,
``protocol/<adapter>/<name>`` for every protocol of every adapter (its schema's defaults are the published recipe),
``trainer/default`` and ``logger/wandb`` from :class:`TrainerConfig` and :class:`LoggerConfig`, and
``schema/task/<adapter>`` and ``schema/trainer`` for the YAML recipes that extend them (``recipes/task/*.yaml``,
``recipes/trainer/video.yaml``: ``defaults: [/schema/task/<adapter>@_here_, _self_]``). ``protocol=NAME`` is the
task adapter's own schema: :func:`compose` turns it into ``protocol=<adapter>/NAME``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from transfer.errors import ConfigError
from transfer.registry import UnknownNameError

RECIPES_DIR = Path(os.environ.get("TRANSFER_RECIPES", Path(__file__).resolve().parent.parent / "recipes"))
GROUPS = ("task", "backbone", "protocol", "trainer", "logger")
WEIGHT_KEYWORDS = ("pretrained", "random")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
# Accelerators this suite runs on; Lightning knows more (tpu, mps) that no adapter supports.
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
# Lightning strategies a run may name; "auto" picks DDP when more than one process trains.
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp", "deepspeed")
WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class BackboneConfig:
    name: str = "rs50"
    weights: str = "pretrained"  # pretrained | random | /path/to/file
    strict: bool = True
    # strict=false refuses a load covering less than this fraction of the backbone's tensors (docs/weights.md;
    # the default is transfer.weights.DEFAULT_MIN_LOADED_FRACTION)
    min_loaded_fraction: float = 0.9
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        from transfer.backbones import BACKBONES

        BACKBONES.get(self.name)
        if not 0.0 <= self.min_loaded_fraction <= 1.0:
            raise ConfigError(f"backbone.min_loaded_fraction={self.min_loaded_fraction} must be in [0, 1].")
        if self.weights not in WEIGHT_KEYWORDS and not Path(os.path.expanduser(self.weights)).exists():
            raise ConfigError(f"backbone.weights={self.weights!r} is neither 'pretrained', 'random' nor an "
                              "existing file. Pass one of those, e.g. backbone.weights=/path/to/model.safetensors.")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"backbone.drop_path_rate={self.drop_path_rate} must be in [0, 1).")


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto | cpu | gpu | cuda
    devices: Any = 1  # a count, or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto picks DDP when devices > 1 or num_nodes > 1
    precision: str = "auto"  # auto: bf16-mixed where the hardware supports it, else 32-true
    channels_last: bool = True
    max_epochs: int = 10
    max_steps: int = -1
    limit_train_batches: float = 1.0
    limit_eval_batches: float = 1.0
    batch_size: int = 64
    eval_batch_size: int = 128
    num_workers: int = 2
    log_every_n_steps: int = 10
    seed: int = 0
    deterministic: bool = False
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.accelerator not in ACCELERATORS:
            raise ConfigError(f"trainer.accelerator={self.accelerator!r}; valid: {', '.join(ACCELERATORS)}.")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"trainer.strategy={self.strategy!r}; valid: {', '.join(STRATEGIES)}.")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision={self.precision!r}; valid: {', '.join(PRECISIONS)}.")
        if not (self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1)):
            raise ConfigError(f"trainer.devices={self.devices!r} must be a positive count or 'auto'.")
        for key in ("num_nodes", "batch_size", "eval_batch_size", "max_epochs", "log_every_n_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key}={getattr(self, key)} must be at least 1.")
        if self.num_workers < 0:
            raise ConfigError(f"trainer.num_workers={self.num_workers} must be 0 or more.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"trainer.max_steps={self.max_steps} must be a positive step count, or -1 for no limit.")
        for key in ("limit_train_batches", "limit_eval_batches"):
            value = getattr(self, key)
            if value <= 0 or (value > 1 and not float(value).is_integer()):
                raise ConfigError(f"trainer.{key}={value} must be a fraction in (0, 1] of the batches or a whole "
                                  "number of batches.")
        if not 0 <= self.seed < 2**32:  # Lightning would replace an out-of-range seed with a random one
            raise ConfigError(f"trainer.seed={self.seed} must be in [0, 2**32).")


@dataclass
class WandbConfig:
    # Offline by default (no account needed; upload later with `wandb sync <run_dir>/wandb`).
    mode: str = "offline"  # online | offline | disabled
    project: str = "resnet-rs-transfer"
    entity: str | None = None
    group: str | None = None  # default: the task name, so W&B groups runs of one task
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 30.0  # seconds; online mode falls back to offline after a failure

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"logger.wandb.mode={self.mode!r}; valid: {', '.join(WANDB_MODES)}.")
        if not self.init_timeout > 0:
            raise ConfigError(f"logger.wandb.init_timeout={self.init_timeout} must be a positive number of seconds.")


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunDirConfig:
    dir: str | None = None  # default: <root>/<task>/<backbone>-<protocol>/<timestamp>
    root: str = "runs"
    cache_dir: str | None = None  # feature caches; default: <root>/.cache


@dataclass
class RunConfig:
    task: Any
    protocol: Any
    backbone: BackboneConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    run: RunDirConfig
    resume: bool = False
    # resume=true refuses a configuration that differs from the run's config.yaml (listing the keys);
    # true continues with the new values, which take effect from the resumed epoch and are recorded.
    resume_allow_changes: bool = False

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))


def check_accelerator(cfg: TrainerConfig) -> None:
    """``trainer.accelerator=gpu`` (or ``cuda``) on a machine without a visible CUDA device is an error."""
    import torch

    if cfg.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={cfg.accelerator!r} but no CUDA device is visible; "
                          "use trainer.accelerator=auto or cpu.")


def resolve_accelerator(cfg: TrainerConfig) -> str:
    """``trainer.accelerator`` with ``auto`` resolved: ``cuda`` where a CUDA device is visible, else ``cpu``."""
    import torch

    if cfg.accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_accelerator(cfg)
    return cfg.accelerator


# Variables set by the launchers Lightning understands (torchrun, SLURM, MPI, LSF) or by hand per node.
LAUNCHER_VARIABLES = ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "LSB_JOBID", "MASTER_ADDR")


def check_trainer(cfg: TrainerConfig) -> None:
    """What the machine must offer for ``cfg``: checked here so that Lightning never fails after a run began."""
    import importlib.util

    import torch

    check_accelerator(cfg)
    cuda = cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())
    if cuda and isinstance(cfg.devices, int) and cfg.devices > torch.cuda.device_count():
        raise ConfigError(f"trainer.devices={cfg.devices} but {torch.cuda.device_count()} CUDA device(s) are "
                          "visible; use trainer.devices=auto or a smaller count.")
    if not cuda and cfg.precision == "16-mixed":  # Lightning would silently run bf16-mixed instead
        raise ConfigError("trainer.precision='16-mixed' needs a CUDA device; on the CPU use bf16-mixed, 32-true or "
                          "auto.")
    if cuda and cfg.precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"trainer.precision={cfg.precision!r} but this GPU has no bfloat16 support; use "
                          "16-mixed, 32-true or auto.")
    if cfg.strategy == "fsdp" and not cuda:
        raise ConfigError("trainer.strategy='fsdp' needs CUDA devices; use trainer.strategy=ddp on the CPU.")
    if cfg.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("trainer.strategy='deepspeed' needs the deepspeed package (pip install deepspeed); or "
                          "use trainer.strategy=ddp.")
    if cfg.num_nodes > 1 and not any(os.environ.get(v) for v in LAUNCHER_VARIABLES):
        raise ConfigError(f"trainer.num_nodes={cfg.num_nodes} needs a launcher that starts one process per device "
                          "on every node (torchrun or srun; README, 'Many GPUs and nodes'); started alone this "
                          "process would wait for the others forever.")


def _flag(raw: DictConfig, key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false.")
    return value


def _schema_defaults(schema: type) -> dict:
    """``schema``'s fields and defaults as plain data (a required field is ``???``): a ConfigStore node. Untyped on
    purpose: :func:`validate` checks the composed config against the schema and names a bad key with the closest
    valid one."""
    return OmegaConf.to_container(_structured(schema), resolve=False)


_REGISTERED: tuple | None = None  # what register_recipes last stored: the registries' entries


def _share_config_store(store_class: type) -> None:
    """Make a deep copy of Hydra's ConfigStore the store itself (it is a singleton).

    Hydra 1.3 deep-copies its config repository at every compose (``CachingConfigRepository``), and with it the
    whole ConfigStore the repository's structured-config source holds: every backbone, protocol and schema node
    registered here, about a fifth of a compose's time. That copy is only read during the compose (a node is
    deep-copied again when it is loaded), so reading the live store gives the same config; later Hydra versions
    read the live store there themselves (facebookresearch/hydra pull request 2928). A Hydra whose ConfigStore
    defines its own ``__deepcopy__`` is left alone."""
    if "__deepcopy__" not in vars(store_class):
        store_class.__deepcopy__ = lambda self, memo: self


def register_recipes() -> None:
    """Register the recipes that come from code in Hydra's ConfigStore (see the module docstring); idempotent.
    Every compose calls it: it stores again only when the backbone or task registry changed since the last call."""
    global _REGISTERED
    from hydra.core.config_store import ConfigStore

    from transfer.backbones import BACKBONES
    from transfer.tasks import TASKS, load_adapters

    load_adapters()
    _share_config_store(ConfigStore)
    store = ConfigStore.instance()
    registered = (tuple(BACKBONES.names()), tuple((n, id(TASKS.get(n))) for n in TASKS.names()))
    if registered == _REGISTERED and "backbone" in store.repo:
        return
    backbone = _schema_defaults(BackboneConfig)
    for name in BACKBONES.names():
        store.store(group="backbone", name=name, node={**backbone, "name": name})
    for adapter_name in TASKS.names():
        adapter = TASKS.get(adapter_name)
        store.store(group="schema/task", name=adapter_name, node=_schema_defaults(adapter.config_class))
        for protocol, schema in adapter.protocols.items():
            store.store(group=f"protocol/{adapter_name}", name=protocol, node=_schema_defaults(schema))
    store.store(group="schema", name="trainer", node=_schema_defaults(TrainerConfig))
    store.store(group="trainer", name="default", node=_schema_defaults(TrainerConfig))
    store.store(group="logger", name="wandb", node=_schema_defaults(LoggerConfig))
    _REGISTERED = registered


def recipe_names(group: str) -> list[str]:
    """The names ``group=NAME`` accepts: the backbone registry's entries, every adapter's protocol names, the YAML
    recipes of ``recipes/<group>/`` and the ConfigStore nodes of the group."""
    from transfer.tasks import TASKS, load_adapters

    if group == "backbone":
        from transfer.backbones import BACKBONES

        return BACKBONES.names()
    if group == "protocol":
        load_adapters()
        return sorted({p for a in TASKS.names() for p in TASKS.get(a).protocols})
    from hydra.core.config_store import ConfigStore

    register_recipes()
    store = ConfigStore.instance()
    stored = [n.removesuffix(".yaml") for n in store.list(group) if n.endswith(".yaml")] \
        if group in store.repo else []
    return sorted({*stored, *(p.stem for p in (RECIPES_DIR / group).glob("*.yaml"))})


def _file_version(path: Path) -> tuple[str, int, int, int]:
    """``path`` with its inode, modification time (ns) and size: a cache key that changes when the file is rewritten
    (in place or replaced)."""
    stat = path.stat()
    return str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=256)
def _recipe_adapter(path: str, inode: int, mtime_ns: int, size: int) -> str | None:
    """The ``adapter:`` value of task recipe ``path`` as read at that version (one YAML parse per version: every
    compose asks for it several times)."""
    adapter = OmegaConf.load(path).get("adapter")
    return str(adapter) if adapter else None


@functools.lru_cache(maxsize=16)
def _recipe_defaults(path: str, inode: int, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    """``(group, choice)`` of every mapping in the defaults list of primary config ``path`` at that version."""
    return tuple((str(k), str(v)) for d in OmegaConf.load(path).defaults if isinstance(d, DictConfig)
                 for k, v in d.items())


def task_adapter(task: str) -> str:
    """The adapter named by task recipe ``task`` (its ``adapter:`` key); :class:`UnknownNameError` for no recipe."""
    path = RECIPES_DIR / "task" / f"{task}.yaml"
    if not path.is_file():
        raise UnknownNameError("task", task, recipe_names("task"), hint=f"Recipes live in {RECIPES_DIR / 'task'}.")
    adapter = _recipe_adapter(*_file_version(path))
    if not adapter:
        raise ConfigError(f"task recipe {str(path)!r} has no 'adapter' key.")
    return adapter


def default_choice(group: str) -> str:
    """The choice of ``group`` in recipes/config.yaml's defaults list (``protocol``: ``<adapter>/<name>``)."""
    return next(choice for key, choice in _recipe_defaults(*_file_version(RECIPES_DIR / "config.yaml"))
                if key == group)


def adapter_protocols(task: str) -> dict[str, type]:
    """Protocol name -> schema of the adapter that task recipe ``task`` names."""
    from transfer.tasks import TASKS, load_adapters

    load_adapters()
    return dict(TASKS.get(task_adapter(task)).protocols)


SUITE_KEY = "suite"  # suite=NAME / suite.<key>=...: read by transfer.suite, never part of a run's config


def top_level_keys() -> list[str]:
    """The top-level keys ``python -m transfer.run`` accepts: the recipe groups and :class:`RunConfig`'s other
    fields, and ``suite`` (:mod:`transfer.suite`)."""
    return sorted([*RunConfig.__dataclass_fields__, SUITE_KEY])


def did_you_mean(key: str, value: str | None, choices: list[str], *, prefix: str = "", rest: str = "") -> str:
    """`` Did you mean protocol=knn?`` for the choice closest to ``key`` (then ``rest`` and ``=value``), or "" when
    none is genuinely close (a strict cutoff: a far name with the typed value would mislead). ``name`` is never
    suggested: a recipe's name is chosen with ``group=NAME``."""
    from transfer.registry import closest_match

    best = closest_match(key, [c for c in choices if c != "name"], cutoff=0.7)  # name: a recipe's, never a typo
    return f" Did you mean {prefix}{best}{rest}{'' if value is None else '=' + value}?" if best else ""


def check_top_level_keys(keys: list[str], valid: list[str] | None = None) -> None:
    """Refuse a first key that is no key of the run config (``protocl=knn``, ``+protocl=knn``, ``trainr.max_epochs=3``)
    naming the closest valid one, instead of letting Hydra add it unused. ``keys`` are overrides ``key=value``;
    ``valid`` defaults to :func:`top_level_keys`."""
    valid = top_level_keys() if valid is None else valid
    for ov in keys:
        key, sep, value = ov.partition("=")
        key = key.lstrip("+~")
        head, _, rest = key.partition(".")
        if head not in valid:
            hint = did_you_mean(head, value if sep else None, valid, rest=f".{rest}" if rest else "")
            raise ConfigError(f"unknown key {key!r} ({ov}).{hint} Valid top-level keys: {', '.join(valid)}; a nested "
                              "key is written section.key=value (python -m transfer.run --help lists the common "
                              "ones).")


GROUP_HINTS = {"backbone": "Backbones are the registry's entries (transfer/backbones; python -m transfer.run --help)."}


def check_group_choices(overrides: list[str]) -> None:
    """Fail on ``task=nope`` before composing, listing the valid names and the closest match (``protocol=`` is
    checked against the task's adapter by :func:`protocol_overrides`)."""
    for ov in overrides:
        key, sep, value = ov.partition("=")
        key = key.lstrip("+~")
        if sep and key in GROUPS and key != "protocol" and "," not in value:
            names = recipe_names(key)
            if value not in names:
                raise UnknownNameError(key, value, names, hint=GROUP_HINTS.get(key, f"Recipes live in "
                                                                                   f"{RECIPES_DIR / key}."))


RECIPE_NAME_KEYS = {"protocol.name": "protocol", "task.name": "task", "task.adapter": "task"}
# What to set instead of a published fact (a task schema's ``published_*`` / ``scratch_recipe`` key, see
# :func:`published_fact_keys`); a fact missing here names no replacement.
PUBLISHED_INSTEAD = {"published_epochs": "trainer.max_epochs", "published_drop_path_rate": "backbone.drop_path_rate"}


def is_published_fact(key: str) -> bool:
    """Whether task-schema field ``key`` records what the paper did (``published_*``, ``scratch_recipe``): a fact
    the comparison with the published numbers is measured against, never a setting of the run."""
    return key.startswith("published_") or key == "scratch_recipe"


def published_fact_keys() -> dict[str, list[str]]:
    """``task.<key>`` -> the adapters whose task schema has that published-fact field."""
    from transfer.tasks import TASKS, load_adapters

    load_adapters()
    out: dict[str, list[str]] = {}
    for name in TASKS.names():
        for key in field_names(TASKS.get(name).config_class):
            if is_published_fact(key):
                out.setdefault(f"task.{key}", []).append(name)
    return out


def check_fixed_keys(overrides: list[str]) -> None:
    """Refuse overrides of what a recipe fixes: its name (``protocol.name=finetune`` would swap the schema under the
    other keys; ``protocol=finetune`` chooses the recipe) and the published recipe's facts (``task.published_epochs``:
    changing the fact would make any run look comparable with the paper). Raises :class:`ConfigError`."""
    for ov in overrides:
        key, sep, value = ov.partition("=")
        key = key.lstrip("+~")
        if key in RECIPE_NAME_KEYS:
            group = RECIPE_NAME_KEYS[key]
            raise ConfigError(f"{key} cannot be overridden: use {group}={value or 'NAME'} (a recipe), not "
                              f"{key}={value}.")
        head, _, field = key.partition(".")
        if head == "task" and is_published_fact(field):
            instead = PUBLISHED_INSTEAD.get(field)
            raise ConfigError(f"{key} is a fact of the published recipe (what the paper did), not a setting; "
                              + (f"set {instead} instead (a run that differs is reported as not comparable)."
                                 if instead else "a run with other values is reported as not comparable."))


def task_protocol_schema(task: str, name: str, *, default_task: bool = False, command: str = "") -> type:
    """The schema of ``protocol=name`` for task recipe ``task`` (``default_task``: no ``task=`` was given). A name
    its adapter does not take is a :class:`ConfigError` listing the ones it does and the task recipes that take
    ``name`` (``protocol=eval``: task imagenet), with the command (``command``, e.g. ``--help protocol=eval``) to
    run with one of them."""
    protocols = adapter_protocols(task)
    if name in protocols:
        return protocols[name]
    takers = [t for t in recipe_names("task") if name in adapter_protocols(t)]
    default = " (the default task; none was given)" if default_task else ""
    text = f"protocol={name!r} does not apply to task {task!r}{default}; valid protocols for it: {', '.join(protocols)}"
    text += "."
    if takers:
        shown = ", ".join(takers[:8]) + (", ..." if len(takers) > 8 else "")
        text += (f" {name} is taken by task {shown}: run python -m transfer.run {command or f'protocol={name}'} "
                 f"task={takers[0]}.")
    raise ConfigError(text)


def protocol_overrides(overrides: list[str]) -> list[str]:
    """``protocol=NAME`` -> ``protocol=<adapter>/NAME``, the adapter being the chosen task's (``task=``, else the
    default task); a name the adapter does not take is a :class:`ConfigError` listing the ones it does."""
    tasks = [ov.partition("=")[2] for ov in overrides if ov.partition("=")[0].lstrip("+") == "task"]
    task = tasks[-1] if tasks else default_choice("task")
    out = []
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if sep and key.lstrip("+") == "protocol":
            task_protocol_schema(task, value, default_task=not tasks)
            ov = f"{key}={task_adapter(task)}/{value}"
        out.append(ov)
    return out


# Hydra composes its own settings (the hydra node) with every config; only @hydra.main applies its two logging
# setups, which compose() never does, and the run config leaves the hydra node out: their empty recipes spare
# every compose reading and merging two YAML files (bench/bench_config.py). "hydra" is no key a user may set.
HYDRA_OVERRIDES = ("hydra/job_logging=none", "hydra/hydra_logging=none")


def compose(overrides: list[str]) -> DictConfig:
    """Compose ``recipes/config.yaml`` with ``key=value`` overrides, once; interpolations resolved.

    A dotted override is applied with Hydra's ``++`` (set, or add when absent): every key of a section's schema
    is already in the composed section (the recipes extend the registered schemas), so an added key is one no
    schema has, which :func:`validate` refuses naming the closest valid key.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    check_top_level_keys(overrides)
    check_fixed_keys(overrides)
    check_group_choices(overrides)
    hydra_overrides = [f"++{o}" if "." in o.partition("=")[0] and o[0] not in "+~" and "=" in o else o
                       for o in protocol_overrides(overrides)]
    register_recipes()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=[*HYDRA_OVERRIDES, *hydra_overrides])
        OmegaConf.resolve(cfg)
        return cfg
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"could not compose the configuration from {overrides}: {e}") from None


@functools.cache  # a schema's annotations are fixed; every validate asks for each section's
def _nested_schemas(schema: type) -> dict[str, type]:
    """The fields of dataclass ``schema`` whose type is itself a dataclass (``logger.wandb``)."""
    import typing

    try:
        hints = typing.get_type_hints(schema)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: check this level only
        return {}
    return {name: hint for name, hint in hints.items()
            if name in schema.__dataclass_fields__ and dataclasses.is_dataclass(hint)}


def unknown_keys(schema: type, node: Any, where: str, *, other: tuple[str, list[str]] | None = None,
                 what: str = "") -> None:
    """Raise :class:`ConfigError` for the first key of ``node`` that ``schema`` has no field for, naming the
    closest field (``trainer.max_epoch=3``: did you mean ``trainer.max_epochs=3``) and the valid ones. ``other``,
    ``(section, its keys)``: a key of that section instead (video's ``protocol.randaugment``, which is
    ``task.randaugment``) is named as such; ``what`` names ``where``'s schema in that message."""
    if not isinstance(node, DictConfig):
        return
    fields = field_names(schema)
    nested = _nested_schemas(schema)
    for key in node.keys():
        key = str(key)
        if key not in fields:
            value = OmegaConf.to_container(node, resolve=False).get(key)
            shown = "null" if value is None else str(value)
            valid = f" Valid keys of {where}: {', '.join(fields)}."
            if other is not None and key in other[1]:
                raise ConfigError(f"unknown key '{where}.{key}': {where}.{key} is not a key of {what or where}; the "
                                  f"{other[0]} has {other[0]}.{key} ({other[0]}.{key}={shown}).{valid}")
            hint = getattr(schema, "UNKNOWN_KEY_HINT", "")
            raise ConfigError(f"unknown key '{where}.{key}' ({where}.{key}={shown})."
                              f"{did_you_mean(key, shown, fields, prefix=where + '.')} Valid keys of {where}: "
                              f"{', '.join(fields)}.{' ' + hint if hint else ''}")
        if key in nested:
            unknown_keys(nested[key], node[key], f"{where}.{key}")


def field_names(schema: type) -> list[str]:
    """The configurable keys of a dataclass schema: its fields, never its ``ClassVar`` constants."""
    return [f.name for f in dataclasses.fields(schema)]


@functools.cache
def _structured(schema: type) -> DictConfig:
    """``OmegaConf.structured(schema)``, built once per schema: only ever the first, deep-copied argument of
    ``OmegaConf.merge`` (never changed itself)."""
    return OmegaConf.structured(schema)


def _typed(schema: type, node: Any, where: str, **hints: Any) -> Any:
    unknown_keys(schema, node, where, **hints)
    try:
        merged = OmegaConf.merge(_structured(schema), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        raise ConfigError(f"invalid {where} configuration: {msg} (valid keys: "
                          f"{', '.join(field_names(schema))})") from None


def validate(raw: DictConfig) -> RunConfig:
    """Check every section against its schema; the task and protocol schemas come from the task adapter.

    A protocol schema with a ``canonical()`` method names the protocol the run really is (a dense task's
    ``finetune`` with ``freeze_backbone=true`` is ``frozen``): the :class:`RunConfig` holds that one.
    """
    from transfer.protocols import protocol_schema
    from transfer.tasks import TASKS, load_adapters

    load_adapters()
    check_top_level_keys([str(k) for k in raw.keys()], [k for k in top_level_keys() if k != SUITE_KEY])
    for key in ("task", "protocol"):
        if not isinstance(raw.get(key), DictConfig) or "name" not in raw[key]:
            raise ConfigError(f"the {key} recipe must be a mapping with a 'name' key; got {raw.get(key)!r}")
    adapter_name = raw.task.get("adapter")
    if not adapter_name:
        raise ConfigError(f"task recipe {raw.task.name!r} has no 'adapter' key; valid adapters: {TASKS.names()}")
    adapter = TASKS.get(str(adapter_name))
    schema = protocol_schema(adapter.protocols, str(raw.protocol.name), task=str(raw.task.name))
    protocol = _typed(schema, raw.protocol, "protocol", other=("task", field_names(adapter.config_class)),
                      what=f"{adapter_name}'s {raw.protocol.name} protocol")
    if hasattr(protocol, "canonical"):
        protocol = protocol.canonical()
        protocol_schema(adapter.protocols, protocol.name, task=str(raw.task.name))
    cfg = RunConfig(
        task=_typed(adapter.config_class, raw.task, "task", other=("protocol", field_names(schema)),
                    what=f"{adapter_name}'s task schema"),
        protocol=protocol,
        backbone=_typed(BackboneConfig, raw.backbone, "backbone"),
        trainer=_typed(TrainerConfig, raw.trainer, "trainer"),
        logger=_typed(LoggerConfig, raw.logger, "logger"),
        run=_typed(RunDirConfig, raw.get("run", {}), "run"),
        resume=_flag(raw, "resume"),
        resume_allow_changes=_flag(raw, "resume_allow_changes"),
    )
    check_trainer(cfg.trainer)
    if adapter.check is not None:
        adapter.check(cfg)
    return cfg
