"""``python -m transfer.run --help``: what can be run, the common keys, where results go; ``--help task=NAME`` (or
``protocol=NAME``) the keys of one recipe.

Everything listed is read from where it is defined, so the help cannot drift from the code: task recipes from
``recipes/task/`` and the adapters they name (:data:`transfer.tasks.TASKS`), backbones from
:data:`transfer.backbones.BACKBONES`, protocols from each adapter's ``protocols`` (``--help protocol=NAME`` shows the
schema of the chosen task's adapter, default task when none is given), keys and defaults from the config schemas
and the composed recipes, descriptions from the recipes' and schemas' own comments.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf

from transfer.config import (
    GROUPS,
    RECIPES_DIR,
    RunConfig,
    compose,
    default_choice,
    recipe_names,
    task_adapter,
    top_level_keys,
)
from transfer.registry import UnknownNameError

DOCS_DIR = RECIPES_DIR.parent / "docs"
WIDTH = 112
# The keys most runs touch, in the order a user meets them.
COMMON_KEYS = ("task.data_dir", "task.resolution", "task.limit_per_split", "backbone.weights", "backbone.strict",
               "trainer.max_epochs", "trainer.batch_size", "trainer.precision", "trainer.devices",
               "trainer.num_workers", "trainer.seed", "logger.wandb.mode", "run.root", "run.dir", "run.cache_dir",
               "resume", "resume_allow_changes")
_FIELD = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_]\w*)\s*:(?P<rest>.*)$")


def field_comments(lines: list[str], indent: str | None = None) -> dict[str, str]:
    """``key -> comment`` from source lines ``key: ... # comment`` (YAML or a dataclass body) and the full-line
    comments right above a key; only keys at ``indent`` (the first key's indentation when None)."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = _FIELD.match(line)
        if not m or m["key"] in ("def", "class") or (indent is not None and m["indent"] != indent):
            above = []
            continue
        indent = m["indent"] if indent is None else indent
        trailing = m["rest"].split("  #", 1)[1].strip() if "  #" in m["rest"] else ""
        text = " ".join(x for x in (trailing, " ".join(above)) if x)
        if text:
            out.setdefault(m["key"], text)
        above = []
    return out


def schema_comments(schema: type) -> dict[str, str]:
    """Comments of a config dataclass's fields, each read from the source of the class that declares it: the schema
    itself, or for an inherited field the dataclass base it comes from (depth's protocols share their SGD fields). A
    field the schema declares again takes only its own comment (a base's would describe the base's value). Empty
    where the source is not available."""
    out: dict[str, str] = {}
    for cls in schema.__mro__:
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            body = inspect.getsource(cls).splitlines()[1:]
        except (OSError, TypeError):
            body = []
        comments = field_comments([line for line in body if not line.strip().startswith(('"""', "@"))])
        for key in cls.__dict__.get("__annotations__", {}):
            out.setdefault(key, comments.get(key, ""))  # the first class in the MRO that declares the field
    return {key: text for key, text in out.items() if text}


def recipe_text(group: str, name: str) -> tuple[str, dict[str, str]]:
    """(the recipe's header comment, its per-key comments); empty for a recipe with no YAML file."""
    path = RECIPES_DIR / group / f"{name}.yaml"
    if not path.is_file():
        return "", {}
    lines = path.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    return " ".join(header), field_comments(lines[len(header):], indent="")


def _value(v: Any) -> str:
    if isinstance(v, DictConfig) or isinstance(v, (dict, list)):
        v = OmegaConf.to_container(v) if isinstance(v, DictConfig) else v
        return str(v).replace(" ", "").replace("'", "")
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def schema_keys(schema: type, values: Any, prefix: str) -> list[tuple[str, str, str]]:
    """``(key, value, comment)`` for every field of ``schema`` (nested dataclasses flattened): the value from
    ``values`` (a composed recipe section) when it has the key, else the schema default."""
    try:
        hints = typing.get_type_hints(schema)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: no nesting
        hints = {}
    comments = schema_comments(schema)
    rows = []
    for f in dataclasses.fields(schema):
        given = values.get(f.name, dataclasses.MISSING) if isinstance(values, (DictConfig, dict)) else None
        given = dataclasses.MISSING if given is None and not isinstance(values, (DictConfig, dict)) else given
        if dataclasses.is_dataclass(hints.get(f.name)):
            rows += schema_keys(hints[f.name], {} if given is dataclasses.MISSING else given, f"{prefix}{f.name}.")
            continue
        value = _default(f) if given is dataclasses.MISSING else given
        rows.append((f"{prefix}{f.name}", _value(value), comments.get(f.name, "")))
    return rows


def _table(rows: list[tuple[str, str, str]], indent: str = "  ") -> str:
    width = min(max((len(k) + 1 + len(v) for k, v, _ in rows), default=0), 46)
    out = []
    for key, value, comment in rows:
        left = f"{key}={value}"
        if not comment:
            out.append(indent + left)
            continue
        pad = " " * (width + 3)
        wrapped = textwrap.wrap(comment, WIDTH - len(indent) - width - 3) or [""]
        if len(left) <= width:
            out.append(indent + left.ljust(width) + "   " + wrapped[0])
        else:  # a long key=value gets its own line
            out += [indent + left, indent + pad + wrapped[0]]
        out += [indent + pad + w for w in wrapped[1:]]
    return "\n".join(out)


def _wrap_names(names: list[str], indent: str = "    ") -> str:
    return textwrap.fill(", ".join(names), WIDTH, initial_indent=indent, subsequent_indent=indent)


def _run_schemas() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {name: hints[name] for name in top_level_keys() if dataclasses.is_dataclass(hints.get(name))}


def common_keys() -> list[tuple[str, str, str]]:
    """The :data:`COMMON_KEYS` with the default recipe's values and the schemas' comments."""
    from transfer.tasks import TASKS

    raw = compose([])
    rows = {}
    for section, schema in _run_schemas().items():
        for key, value, comment in schema_keys(schema, raw.get(section), f"{section}."):
            rows[key] = (key, value, comment)
    task_schema = TASKS.get(str(raw.task.adapter)).config_class
    for key, _, comment in schema_keys(task_schema, {}, "task."):
        rows[key] = (key, "null" if key == "task.data_dir" else _value(OmegaConf.select(raw, key)), comment)
    for key in ("resume", "resume_allow_changes"):
        rows[key] = (key, _value(raw.get(key)), {"resume": "true: continue the latest interrupted run (or run.dir) "
                                                            "from its last checkpoint",
                                                 "resume_allow_changes": "with resume=true: continue although the "
                                                                         "config differs (changes are recorded)"}[key])
    return [rows[k] for k in COMMON_KEYS if k in rows]


def tasks_by_adapter() -> dict[str, list[tuple[str, str]]]:
    """adapter name -> (task recipe, its default protocol) of every task recipe that names it."""
    default = default_choice("protocol")
    out: dict[str, list[tuple[str, str]]] = {}
    for name in recipe_names("task"):
        recipe = OmegaConf.load(RECIPES_DIR / "task" / f"{name}.yaml")
        own = [str(v) for d in recipe.get("defaults", []) if isinstance(d, DictConfig)
               for k, v in d.items() if str(k).startswith("override /protocol")]
        # protocol/<adapter>/<name>: the name is what the user types
        out.setdefault(str(recipe.get("adapter", "?")), []).append((name, (own[0] if own else default).split("/")[-1]))
    return out


def docs_pages() -> list[tuple[str, str]]:
    """(path relative to the repository, its title) of every page in ``docs/``."""
    out = []
    for page in sorted(DOCS_DIR.glob("*.md")):
        first = next((line for line in page.read_text().splitlines() if line.startswith("# ")), "# " + page.stem)
        out.append((f"docs/{page.name}", first[2:].strip()))
    return out


def general_help(summary: str) -> str:
    from transfer.backbones import BACKBONES
    from transfer.tasks import TASKS, load_adapters

    load_adapters()
    parts = [summary.strip(), "",
             "usage: python -m transfer.run [task=NAME] [backbone=NAME] [protocol=NAME] [key=value ...]",
             "       python -m transfer.run -m task=A,B backbone=X,Y ...   every combination, one run each",
             "       python -m transfer.run --cfg task=NAME ...             print the composed config, run nothing",
             "       python -m transfer.run --help task=NAME | protocol=NAME  the keys of one recipe", "",
             "Tasks (task=NAME; by adapter, with the protocols it takes and the default one):"]
    for adapter, tasks in sorted(tasks_by_adapter().items()):
        protocols = TASKS.get(adapter).protocols if adapter in TASKS else ()
        defaults = sorted({d for _, d in tasks})
        parts += [f"  {adapter} [protocol={'|'.join(protocols)}; default {' or '.join(defaults)}]:",
                  _wrap_names([name for name, _ in tasks])]
    parts += ["", f"Backbones (backbone=NAME; {len(BACKBONES)} registered, docs/backbone_sheet.md):",
              _wrap_names(BACKBONES.names()), "",
              f"Protocols (protocol=NAME; each adapter has its own schema for a name): "
              f"{', '.join(recipe_names('protocol'))}", "",
              "Common keys (key=default; any schema key may be set, an unknown one is refused):",
              _table(common_keys()), "",
              "Results: each run writes runs/<task>/<backbone>-<protocol>/<timestamp>/ (run.root, run.dir):",
              "  config.yaml, results.json (metrics, counts of skipped inputs, weights and their sha256, comparable "
              "or not),", "  history.json, checkpoints/, wandb/.",
              "  python -m transfer.report runs/ compares every run with the published baselines (docs/comparison.md).",
              "", "Docs:"]
    pages = docs_pages()
    width = max(len(p) for p, _ in pages)
    parts += [f"  {p.ljust(width)}  {title}" for p, title in pages]
    parts += ["  README.md (Usage, Tasks, Backbones)"]
    return "\n".join(parts) + "\n"


def recipe_help(group: str, name: str, task: str | None = None) -> str:
    """The keys of recipe ``group=name``: value in the recipe (else the schema default) and description. A protocol
    is the schema of ``task``'s adapter (the default task when None)."""
    from transfer.config import task_protocol_schema
    from transfer.tasks import TASKS, load_adapters

    load_adapters()
    if group == "protocol":
        schema = task_protocol_schema(task or default_choice("task"), name, default_task=task is None,
                                      command=f"--help protocol={name}")
        task = task or default_choice("task")
        raw = compose([f"task={task}", f"protocol={name}"])
        section, title = raw.protocol, f"protocol={name} (adapter {task_adapter(task)}, task={task})"
        doc = inspect.getdoc(schema) or ""
        header, comments = " ".join(doc.split("\n\n")[0].split()), {}
    else:
        names = recipe_names(group)
        if name not in names:
            raise UnknownNameError(group, name, names, hint=f"Recipes live in {RECIPES_DIR / group}.")
        raw = compose([f"{group}={name}"])
        section = raw[group]
        header, comments = recipe_text(group, name)
        adapter = TASKS.get(str(section.adapter))
        schema, title = adapter.config_class, (f"task={name} (adapter {section.adapter}; "
                                               f"protocol={'|'.join(adapter.protocols)})")
    rows = [(k, v, comments.get(k.split(".", 1)[1].split(".")[0], "") or c)
            for k, v, c in schema_keys(schema, section, f"{group}.")]
    out = [title, textwrap.fill(header, WIDTH) if header else "", "",
           f"Keys ({group}.KEY=VALUE; the value is the recipe's, else the schema default):", _table(rows)]
    return "\n".join(x for x in out if x is not None) + "\n"


def help_text(summary: str, overrides: list[str]) -> str:
    """``--help``: :func:`general_help`; with ``task=NAME`` or ``protocol=NAME``: that recipe's keys."""
    chosen = {o.split("=", 1)[0].lstrip("+"): o.split("=", 1)[1] for o in overrides
              if "=" in o and o.split("=", 1)[0].lstrip("+") in GROUPS}
    if "protocol" in chosen:
        return recipe_help("protocol", chosen["protocol"], task=chosen.get("task"))
    if "task" in chosen:
        return recipe_help("task", chosen["task"])
    return general_help(summary)
