"""Hydra's sweep syntax on the command line (``key=a,b``): the axes of a sweep and every job of it.

Used by ``python -m transfer.run -m`` and by suites (:mod:`transfer.suite`), which both expand a sweep.
"""
from __future__ import annotations

import itertools

from transfer.errors import ConfigError


def sweep_axes(overrides: list[str]) -> list[tuple[str, list[str]]]:
    """``(key, values)`` of every override, ``values`` holding each comma-separated value (Hydra's sweep syntax)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"cannot read the overrides {overrides}: {str(e).splitlines()[0]}") from None
    return [(ov.get_key_element(), list(ov.sweep_string_iterator()) if ov.is_sweep_override()
             else [ov.get_value_element_as_str()]) for ov in parsed]


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every combination of the comma-separated values in ``overrides`` (Hydra's sweep syntax)."""
    axes = [[f"{key}={v}" for v in values] for key, values in sweep_axes(overrides)]
    return [list(combo) for combo in itertools.product(*axes)]
