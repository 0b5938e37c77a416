"""Backbone sheet: parameters, FLOPs and latency of registered backbones, next to their published top-1.

    python -m transfer.bench backbone=rs152
    python -m transfer.bench backbone=all bench.batch_sizes=[1,4,8] bench.out=runs/bench

Writes ``backbone_sheet.md``, ``backbone_sheet.csv``, ``backbone_sheet.png`` (latency vs published
ImageNet top-1, per family) and ``backbone_sheet.json`` (config, machine, rows) to ``bench.out``.
Latency and FLOPs do not depend on the weights, so models are built with random weights and
their 1000-class ImageNet head, as the published parameter counts include it.
"""
from __future__ import annotations

import csv
import io
import os
import platform
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from transfer import tables
from transfer.backbones import BACKBONES, BackboneSpec, build_backbone
from transfer.errors import ConfigError, TransferError
from transfer.io import atomic_path, atomic_write_json, atomic_write_text
from transfer.registry import UnknownNameError

PRECISIONS = ("fp32", "half")
# ImageNet-1k classes of the classifier trained in the training-step timing.
NUM_CLASSES = 1000
# Share of the free host memory a CPU training step may plan to use; see _fits_cpu.
CPU_MEMORY_SHARE = 0.5


@dataclass
class BenchSettings:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 8])
    precisions: list[str] = field(default_factory=lambda: list(PRECISIONS))
    repeats: int = 5
    warmup: int = 2
    resolution: int | None = None  # None: each checkpoint's own test resolution
    # The seed protocol starts training at batch 128 and halves until it fits
    # (tensorflow/tpu models/official/resnet/resnet_rs/README.md). 0 skips the training step.
    train_batch: int = 128
    device: str = "auto"  # auto | cpu | cuda
    # CPU threads (torch.set_num_threads); None keeps torch's default. One thread gives stable
    # figures on a machine whose cores are shared with other work.
    threads: int | None = None
    out: str = "runs/bench"


@dataclass
class BenchConfig:
    backbone: str = "all"  # a registered name, names separated by commas, or all
    bench: BenchSettings = field(default_factory=BenchSettings)


def parse_config(argv: list[str]) -> BenchConfig:
    """``key=value`` arguments (OmegaConf dotlist) -> a checked :class:`BenchConfig`."""
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not key=value. Example: python -m transfer.bench "
                              f"backbone=rs152 bench.repeats=5. Keys: {', '.join(_valid_keys())}.")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(BenchConfig), OmegaConf.from_dotlist(argv))
        cfg: BenchConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"{first} (key {getattr(e, 'full_key', '?')}). Valid keys: "
                          f"{', '.join(_valid_keys())}.") from None
    _check(cfg)
    return cfg


def _valid_keys() -> list[str]:
    return ["backbone"] + [f"bench.{k}" for k in BenchSettings.__dataclass_fields__]


def _check(cfg: BenchConfig) -> None:
    b = cfg.bench
    if not b.batch_sizes or any(n < 1 for n in b.batch_sizes):
        raise ConfigError(f"bench.batch_sizes={b.batch_sizes}: give one or more positive sizes, e.g. [1,4,8].")
    bad = [p for p in b.precisions if p not in PRECISIONS]
    if bad or not b.precisions:
        raise ConfigError(f"bench.precisions={b.precisions}: valid precisions are {list(PRECISIONS)} "
                          "(half = fp16 on CUDA, bf16 on CPU).")
    if b.repeats < 1 or b.warmup < 0:
        raise ConfigError(f"bench.repeats={b.repeats}, bench.warmup={b.warmup}: need repeats >= 1 and warmup >= 0.")
    if b.resolution is not None and b.resolution < 32:
        raise ConfigError(f"bench.resolution={b.resolution}: the networks downsample 32x; use 32 or more, "
                          "or leave it unset for each checkpoint's own resolution.")
    if b.train_batch < 0:
        raise ConfigError(f"bench.train_batch={b.train_batch}: give the starting batch (128 in the seed "
                          "protocol) or 0 to skip the training step.")
    if b.threads is not None and b.threads < 1:
        raise ConfigError(f"bench.threads={b.threads}: give a positive count, or leave it unset for torch's default.")
    if b.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"bench.device={b.device!r}: valid devices are auto, cpu, cuda.")
    if b.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench.device=cuda but torch sees no CUDA device; use bench.device=cpu or auto.")
    select_backbones(cfg.backbone)


def select_backbones(value: str) -> list[BackboneSpec]:
    """``all``, one name or comma-separated names -> registry entries (unknown names raise)."""
    names = BACKBONES.names() if value == "all" else [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"backbone={value!r}: name a backbone, several separated by commas, or all. "
                          f"Registered: {', '.join(BACKBONES.names())}.")
    return [BACKBONES.get(n) for n in names]


def resolve_device(choice: str) -> torch.device:
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def half_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA; bf16 on CPU, where fp16 convolutions have no fast kernels."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, resolution: int, device: torch.device) -> int:
    """FLOPs of one forward pass on one image (torch's counter: convolutions and matmuls; 1 MAC = 2 FLOPs)."""
    x = torch.zeros(1, 3, resolution, resolution, device=device)
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def median_seconds(step: Callable[[], object], *, warmup: int, repeats: int, device: torch.device) -> float:
    """Median wall time of ``step`` over ``repeats`` runs after ``warmup`` untimed runs."""
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync(device: torch.device | str) -> None:
    """Wait for the queued work of ``device`` (a no-op off CUDA), so a timer reads the work done."""
    _sync(torch.device(device))


def timed_loss_step(model: nn.Module, optimizer: torch.optim.Optimizer, data: object,
                    device: torch.device | str) -> tuple[float, float]:
    """One training step of a model that returns a dict of losses (detectron2's meta-architectures): forward,
    backward of the summed losses, optimiser step. Returns (seconds, total loss)."""
    start = time.perf_counter()
    loss = sum(model(data).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    sync(device)
    return time.perf_counter() - start, float(loss)


def inference_latency(model: nn.Module, *, resolution: int, batch: int, dtype: torch.dtype,
                      device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of one eval-mode forward pass of ``batch`` images."""
    x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=dtype)
    model.eval()
    with torch.inference_mode():
        return median_seconds(lambda: model(x), warmup=warmup, repeats=repeats, device=device)


def train_step_latency(model: nn.Module, *, resolution: int, start_batch: int, device: torch.device,
                       warmup: int, repeats: int) -> tuple[int, float] | tuple[None, None]:
    """(batch, median seconds) of an fp32 SGD training step, halving the batch from ``start_batch``
    until it fits in memory, as the seed protocol does. (None, None) when batch 1 does not fit."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    batch = start_batch
    while batch >= 1:
        if device.type == "cpu" and not _fits_cpu(model, resolution, batch):
            batch //= 2
            continue
        x = torch.randn(batch, 3, resolution, resolution, device=device)
        y = torch.randint(0, NUM_CLASSES, (batch,), device=device)

        def step(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        try:
            return batch, median_seconds(step, warmup=warmup, repeats=repeats, device=device)
        except torch.OutOfMemoryError:
            del x, y
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            batch //= 2
    return None, None


def _fits_cpu(model: nn.Module, resolution: int, batch: int) -> bool:
    """Whether a training step of ``batch`` images should fit in the free host memory.

    A CPU allocation failure is not a catchable out-of-memory error as on CUDA: the kernel's OOM
    killer ends the process. So the plan is checked first, from what autograd saves for backward on
    an image (measured with saved-tensor hooks, as no library reports it) times the batch, twice
    over for the gradients of those activations, plus weights, gradients and momentum.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    # Two images: train-mode batch norm needs more than one value per channel at the last stage.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(2, 3, resolution, resolution))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    need = 2 * batch * sum(saved.values()) // 2 + 3 * param_bytes
    return need < CPU_MEMORY_SHARE * _available_memory()


def _available_memory() -> int:
    """Bytes of memory the kernel can hand out now (MemAvailable), or the free pages where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def measure(spec: BackboneSpec, settings: BenchSettings, device: torch.device) -> dict:
    """One row of the sheet: size, cost and latencies of ``spec`` on ``device``."""
    res = settings.resolution or spec.test_res
    model = build_backbone(spec.name, weights="random", keep_classifier=True).model.to(device)
    row: dict = {"backbone": spec.name, "family": spec.family, "resolution": res,
                 "params_m": count_parameters(model) / 1e6,
                 "gmacs": count_flops(model, res, device) / 2e9,
                 "top1_published": spec.top1}
    if settings.train_batch:
        batch, seconds = train_step_latency(model, resolution=res, start_batch=settings.train_batch, device=device,
                                            warmup=settings.warmup, repeats=settings.repeats)
        row.update(train_batch=batch, train_step_s=seconds)
    for precision in settings.precisions:
        dtype = torch.float32 if precision == "fp32" else half_dtype(device)
        model.to(dtype)
        for b in settings.batch_sizes:
            row[f"{precision}_b{b}_ms"] = 1e3 * inference_latency(
                model, resolution=res, batch=b, dtype=dtype, device=device,
                warmup=settings.warmup, repeats=settings.repeats)
    return row


def machine_info(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model() or platform.processor() or platform.machine()
    return {"device": device.type, "name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return ""


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    return cols


HEADERS = {"backbone": "backbone", "family": "family", "resolution": "res", "params_m": "params (M)",
           "gmacs": "GMACs", "top1_published": "top-1 (published)", "train_batch": "train batch",
           "train_step_s": "train step (s)"}


def _header(col: str) -> str:
    if col in HEADERS:
        return HEADERS[col]
    precision, batch, _ = col.split("_")  # "fp32_b8_ms"
    return f"{precision} b{batch[1:]} (ms)"


def _cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if value < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """The sheet as a markdown table; a missing value (no published top-1, no fitting batch) is —."""
    cols = _columns(rows)
    return tables.markdown_table([_header(c) for c in cols], [[_cell(row.get(c)) for c in cols] for row in rows]) + "\n"


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot(rows: list[dict], path: Path, *, machine: str) -> None:
    """Latency vs published top-1, one line per family: training step (when timed) and inference."""
    from matplotlib.figure import Figure  # the object API: no pyplot global state

    infer_col = next((c for c in reversed(_columns(rows)) if c.startswith("fp32_")), None)
    panels = [(c, label) for c, label in (("train_step_s", "training step (s)"),
                                          (infer_col, f"inference {_header(infer_col or 'fp32_b1_ms')}"))
              if c and any(r.get(c) is not None for r in rows)]
    fig = Figure(figsize=(6 * max(1, len(panels)), 4.5), layout="constrained")
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    unplotted = sorted(r["backbone"] for r in rows if r.get("top1_published") is None)
    for ax, (col, label) in zip(axes, panels):
        for family in sorted({r["family"] for r in rows}):
            names: dict[tuple[float, float], list[str]] = {}  # entries sharing a point share one label
            for r in rows:
                if r["family"] == family and r.get(col) is not None and r.get("top1_published") is not None:
                    names.setdefault((r[col], r["top1_published"]), []).append(r["backbone"])
            if not names:
                continue
            pts = sorted(names)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=family)
            for x, y in pts:
                ax.annotate(" / ".join(names[x, y]), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xlabel(f"{label}, measured")
        ax.set_ylabel("ImageNet top-1 (%), published")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    note = f"{machine}" + (f"; no published top-1: {', '.join(unplotted)}" if unplotted else "")
    fig.suptitle(textwrap.fill(note, 110 * len(axes)), fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def run(cfg: BenchConfig) -> dict[str, Path]:
    """Measure every selected backbone and write the sheet; return the written files.

    Entries that are the same network at the same resolution (one architecture, several weights) are measured
    once and share the figures. Each backbone prints a progress line ``[i/n] name at R px`` on stderr. The sheet
    is rewritten after every backbone, so a long run that is stopped keeps what it measured.
    """
    specs = select_backbones(cfg.backbone)
    device = resolve_device(cfg.bench.device)
    if cfg.bench.threads:
        torch.set_num_threads(cfg.bench.threads)
    info = machine_info(device)
    out = Path(cfg.bench.out)
    files = {k: out / f"backbone_sheet.{k}" for k in ("md", "csv", "png", "json")}
    rows: list[dict] = []
    measured: dict[tuple, dict] = {}
    first: dict[tuple, str] = {}  # the backbone each measurement was made for
    for i, spec in enumerate(specs, start=1):
        res = cfg.bench.resolution or spec.test_res
        key = (spec.arch, repr(sorted(spec.arch_kwargs.items())), res)
        # One line per backbone on stderr (each takes seconds to minutes): progress also in a log file.
        print(f"[{i}/{len(specs)}] {spec.name} at {res} px" + (f": the network of {first[key]}, figures shared"
                                                                if key in measured else ""),
              file=sys.stderr, flush=True)
        if key not in measured:
            measured[key], first[key] = measure(spec, cfg.bench, device), spec.name
        rows.append({**measured[key], "backbone": spec.name, "family": spec.family, "top1_published": spec.top1})
        atomic_write_text(files["md"], markdown_table(rows))
        atomic_write_text(files["csv"], csv_text(rows))
        atomic_write_json(files["json"], {"config": asdict(cfg), "machine": info,
                                          "command": "python -m transfer.bench " + " ".join(_argv_of(cfg)),
                                          "rows": rows})
    plot(rows, files["png"], machine=f"{info['name']} ({info['device']}, {info['threads']} threads)")
    return files


def _argv_of(cfg: BenchConfig) -> list[str]:
    def text(v: object) -> str:
        return "[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else str(v)

    return [f"backbone={cfg.backbone}"] + [f"bench.{k}={text(v)}" for k, v in asdict(cfg.bench).items()
                                           if v is not None and k != "out"]


def main(argv: list[str] | None = None) -> int:
    """``python -m transfer.bench key=value ...``; a bad argument ends with one message, no traceback."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ + "\nKeys: " + ", ".join(_valid_keys()))
        return 0
    try:
        files = run(parse_config(argv))
    except (TransferError, UnknownNameError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(files["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in files.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
