"""Protocol schemas that several task adapters share, and how an adapter's protocols are looked up.

Every other protocol schema belongs to its adapter (``TaskAdapter.protocols``: protocol name -> schema): the
classification probes and fine-tuning in ``tasks/classification/protocols.py``, the 3D fine-tuning recipe in
``video/config.py``, NYU depth's SGD recipe (``finetune``, ``frozen``) in ``tasks/depth/config.py``, ``eval`` in
``tasks/imagenet/config.py``. A schema's defaults are its published recipe; it is
registered in Hydra's ConfigStore as ``protocol/<adapter>/<name>`` (:func:`transfer.config.register_recipes`),
so ``protocol=NAME`` composes the task adapter's own schema.

A schema may declare, as ``ClassVar``:

- ``UNCHECKED_KEYS``: fields a run may change and stay comparable, with the reason
  (:func:`transfer.compare.protocol_deviations` checks every other field against the defaults);
- ``PUBLISHED = False``: no published counterpart, so nothing to deviate from;
- ``FROZEN = True``: the backbone's features are scored as they are (random weights there measure nothing);
- a method ``canonical()`` returning the protocol the run really is (``validate`` records that one);
- ``UNKNOWN_KEY_HINT``: a sentence added to the error for a key the schema does not have.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from transfer.errors import ConfigError


def check_sgd_momentum(momentum: float, nesterov: bool) -> None:
    """:class:`ConfigError` for ``protocol.nesterov=true`` with ``protocol.momentum=0``: Nesterov's update needs a
    momentum (``torch.optim.SGD`` refuses the pair), so a run would either fail late or, turned off quietly, record
    a Nesterov recipe in results.json that never ran. Called by every protocol schema with both fields."""
    if nesterov and momentum == 0:
        raise ConfigError(f"protocol.nesterov=true needs protocol.momentum > 0 (got protocol.momentum={momentum}); "
                          "set protocol.momentum (e.g. 0.9) or protocol.nesterov=false for plain SGD.")


@dataclass
class FrozenProtocolConfig:
    """Frozen-backbone transfer: only the task's head trains on the backbone's features.

    The task recipe holds every training value; the backbone's weights and its batch-norm statistics stay as
    loaded (how many levels: the task recipe's choice, every level by default). A run of this protocol has its
    own run folder (``<backbone>-frozen``), ``protocol: frozen`` in results.json and W&B, and is never compared
    with fine-tuned baselines.
    """

    FROZEN: ClassVar[bool] = True

    name: str = "frozen"


@dataclass
class RecipeFinetuneProtocolConfig:
    """Fine-tuning whose training values all live in the task recipe (its solver or optimiser section).

    ``freeze_backbone=true`` is frozen transfer: :meth:`canonical` turns the run into ``protocol=frozen``, so it
    lands in ``<backbone>-frozen``, is recorded as ``protocol: frozen`` and is compared with the frozen rows, the
    same run as ``protocol=frozen``.
    """

    UNCHECKED_KEYS: ClassVar[dict[str, str]] = {
        "freeze_backbone": "true makes the run protocol=frozen, compared with the frozen rows",
    }
    UNKNOWN_KEY_HINT: ClassVar[str] = ("The training values are the task recipe's (python -m transfer.run --help "
                                       "task=NAME lists them): set task.<key> instead.")

    name: str = "finetune"
    freeze_backbone: bool = False  # true: train only the task's head (the same run as protocol=frozen)

    def canonical(self) -> RecipeFinetuneProtocolConfig | FrozenProtocolConfig:
        return FrozenProtocolConfig() if self.freeze_backbone else self


def protocol_schema(protocols: dict[str, type], name: str, *, task: str) -> type:
    """The schema of protocol ``name`` in an adapter's ``protocols`` mapping; :class:`ConfigError` naming the valid
    protocols of ``task`` otherwise."""
    if name not in protocols:
        raise ConfigError(f"protocol={name!r} does not apply to task {task!r}; valid protocols for it: "
                          f"{', '.join(protocols)}.")
    return protocols[name]


FROZEN_SUFFIX = "-frozen"


def protocol_label(name: str, protocol_config: dict | None = None) -> str:
    """The protocol a run is filed, tracked and shown under: its protocol ``name``, plus ``-frozen`` when its
    ``protocol_config`` sets ``freeze_backbone`` on a protocol that otherwise trains the backbone (video's and
    classification's ``finetune``: ``finetune-frozen``). A frozen and a fine-tuned run therefore never share a run
    folder (``<backbone>-<label>``), a W&B name/job type/``protocol_name``, or a report or suite cell. (Dense tasks'
    ``finetune`` with ``freeze_backbone=true`` already becomes protocol ``frozen``, see
    :meth:`RecipeFinetuneProtocolConfig.canonical` and depth's ``DepthFinetuneProtocolConfig.canonical``.)"""
    frozen = bool((protocol_config or {}).get("freeze_backbone"))
    return f"{name}{FROZEN_SUFFIX}" if frozen and not name.endswith(("frozen", FROZEN_SUFFIX)) else name


def run_protocol_label(results: dict) -> str:
    """:func:`protocol_label` of a results.json (its ``protocol`` and ``protocol_config``)."""
    return protocol_label(results["protocol"], results.get("protocol_config"))


def config_protocol_label(cfg) -> str:
    """:func:`protocol_label` of a validated :class:`transfer.config.RunConfig` (its ``protocol`` section)."""
    return protocol_label(cfg.protocol.name, {"freeze_backbone": getattr(cfg.protocol, "freeze_backbone", False)})


def is_frozen_protocol(schema: type | None, protocol_config: dict | None = None) -> bool:
    """Whether a run of ``schema`` (with its recorded ``protocol_config``) scores the backbone as it was loaded."""
    return bool(getattr(schema, "FROZEN", False) or (protocol_config or {}).get("freeze_backbone"))
