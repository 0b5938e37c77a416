"""Config composition and validation: ``transfer.config.compose`` + ``validate`` per call, as shipped and with
its savings switched off, side by side in one process.

    python bench/bench_config.py [--rounds 15]

What ``compose`` + ``validate`` spare between calls (``transfer/config.py``): Hydra's ConfigStore is not
deep-copied at every compose (``_share_config_store``), Hydra's two logging setups, which compose never applies,
are its empty recipes (``HYDRA_OVERRIDES``), a task recipe's ``adapter:`` and the primary config's defaults are
parsed once per file version, each schema's structured config and nested sections are built once. The reference
arm undoes all of that before every call (the store deep-copied again, Hydra's default logging recipes, every
cache emptied), which is how every call ran before; caches still serve repeated look-ups inside one call, so
the reference is slightly faster than the old code and the ratio understates the gain. The two arms alternate
call by call (rounds x override sets each), so a load that changes while the bench runs touches both; the
medians per call and their ratio are printed. Compose only (no validate) is measured for every task recipe:
validating them needs their data folders.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# compose + validate: sets that validate without any data folder
VALIDATED = [[], ["task=digits"], ["protocol=knn", "trainer.max_epochs=3"],
             ["backbone=rs152", "backbone.weights=random", "backbone.drop_path_rate=0.1"]]
SHARE_CONFIG_STORE = None  # transfer.config._share_config_store, set by main()
HYDRA_OVERRIDES = ()  # transfer.config.HYDRA_OVERRIDES, set by main()


def _set_savings(on: bool) -> None:
    """The savings as shipped (``on``), or none of them (the reference arm)."""
    from hydra.core.config_store import ConfigStore

    from transfer import config

    # every compose calls config._share_config_store: the reference arm replaces it with a no-op
    config._share_config_store = SHARE_CONFIG_STORE if on else (lambda store_class: None)
    config.HYDRA_OVERRIDES = HYDRA_OVERRIDES if on else ()
    if on:
        SHARE_CONFIG_STORE(ConfigStore)
        return
    for cached in (config._recipe_adapter, config._recipe_defaults, config._structured, config._nested_schemas):
        cached.cache_clear()
    if "__deepcopy__" in vars(ConfigStore):
        del ConfigStore.__deepcopy__


def _time(fn, on: bool) -> float:
    _set_savings(on)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)

    global SHARE_CONFIG_STORE, HYDRA_OVERRIDES
    from transfer import config
    from transfer.config import compose, recipe_names, validate

    SHARE_CONFIG_STORE, HYDRA_OVERRIDES = config._share_config_store, config.HYDRA_OVERRIDES

    validate(compose([]))  # imports, adapters, the ConfigStore: paid once by both arms
    cases = {"compose + validate": [lambda o=o: validate(compose(o)) for o in VALIDATED],
             "compose, every task recipe": [lambda t=t: compose([f"task={t}"]) for t in recipe_names("task")]}
    print(f"{args.rounds} rounds; medians per call in ms\n")
    print("| measurement | calls per arm | as shipped (ms) | reference (ms) | **ratio shipped / reference** |")
    print("|---|---|---|---|---|")
    for name, calls in cases.items():
        on, off = [], []
        for _ in range(args.rounds):
            for call in calls:
                off.append(_time(call, on=False))
                on.append(_time(call, on=True))
        m_on, m_off = statistics.median(on) * 1e3, statistics.median(off) * 1e3
        print(f"| {name} | {len(on)} | {m_on:.1f} | {m_off:.1f} | **{m_on / m_off:.2f}** |")
    _set_savings(True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
