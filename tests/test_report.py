"""The comparison report: many results.json + baselines -> markdown, HTML, PNG (and a W&B Report).

The end-to-end tests run a real offline sweep (two backbones x the digits demo, k-NN, 32 px, random
weights) through ``transfer.run.main``; the others write results.json files with ``write_results``.
"""
from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from suite_helpers import UNREACHABLE

import transfer.baselines
import transfer.run
from transfer.baselines import COLUMNS, baselines_for
from transfer.compare import TABLE_KEY
from transfer.report import build_comparison, build_wandb_report, find_results, main, write_report
from transfer.results import SCHEMA_VERSION, write_results
from transfer.tracking import RunLogger

BACKBONES = ("rs50", "resnet50")
TINY = ["task=digits", "backbone.weights=random", "protocol=knn", "task.resolution=32", "++task.limit_per_split=60",
        "trainer.num_workers=0", "trainer.progress_bar=false"]
# Made-up rows for the demo task, which has no published numbers: the report must show whatever the file holds.
DIGITS_BASELINES = ("# version: 2\n" + ",".join(COLUMNS) + "\n"
                    "simclr,resnet50,imagenet1k_supervised,digits,knn,test row,,test/top1,71.5,test fixture\n"
                    "byol,resnet50,imagenet1k_supervised,digits,knn,test row,,test/top1,80.25,test fixture\n"
                    "byol,resnet50,imagenet1k_supervised,digits,linear,test row,,test/top1,90.0,test fixture\n")


def check_png(path: Path) -> np.ndarray:
    """A real chart: PNG signature, plausible dimensions, and pixels that are not all one colour."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 200 <= width <= 5000 and 100 <= height <= 5000, (width, height)
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert pixels.shape == (height, width, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10 and pixels.std() > 5
    return pixels


class RecordingLogger(RunLogger):
    """Reads the live W&B run object just before it is finished (its summary is gone afterwards)."""

    seen: list[dict] = []

    def finish(self) -> None:
        if self.run is not None:
            summary = {k: self.run.summary[k] for k in self.run.summary.keys()}
            table = summary.get(TABLE_KEY)
            logged = json.loads((Path(self.run.dir) / table["path"]).read_text()) if table else None
            RecordingLogger.seen.append({"name": self.run.name, "summary": summary, "table": logged,
                                         "group": self.run.group, "job_type": self.run.job_type,
                                         "config": dict(self.run.config)})
        super().finish()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    csv = root / "digits_baselines.csv"
    csv.write_text(DIGITS_BASELINES)
    RecordingLogger.seen = []
    with pytest.MonkeyPatch.context() as mp:
        # The function-scoped isolation of conftest.py does not reach a module fixture: the same, by hand.
        home = root / "home"
        for var, value in (("TORCH_HOME", home / "torch"), ("HF_HOME", home / "hf"), ("WANDB_DIR", home / "wandb"),
                           ("HF_ENDPOINT", UNREACHABLE), ("WANDB_SILENT", "true")):
            mp.setenv(var, str(value))
        mp.delenv("WANDB_MODE", raising=False)
        mp.delenv("TRANSFER_RUN_DIR", raising=False)
        mp.setattr(transfer.baselines, "default_path", lambda: csv)
        mp.setattr(transfer.run, "RunLogger", RecordingLogger)
        code = transfer.run.main(["-m", *TINY, f"backbone={','.join(BACKBONES)}", f"run.root={root / 'runs'}",
                                  "logger.wandb.mode=offline"])
    return {"code": code, "root": root / "runs", "csv": csv, "seen": list(RecordingLogger.seen)}


@pytest.mark.e2e
def test_sweep_runs_every_backbone_and_stores_the_baselines_as_context(sweep):
    # Random weights and task.limit_per_split: these runs stand next to no published number.
    assert sweep["code"] == 0
    found = find_results(sweep["root"])
    assert sorted(r["backbone"] for _, r in found) == sorted(BACKBONES)
    rows = baselines_for("digits", metric="test/top1", path=sweep["csv"])
    for _, r in found:
        assert r["comparable"] is False
        reasons = " | ".join(r["comparison"]["reasons"])
        assert "task.limit_per_split=60" in reasons and "backbone.weights=random" in reasons
        assert sorted(b["value"] for b in r["baselines"]) == sorted(b.value for b in rows)
        assert all(not b["comparable"] and b["difference"] is None for b in r["baselines"])


@pytest.mark.e2e
def test_offline_wandb_run_holds_score_baselines_table_and_grouping(sweep):
    seen = sweep["seen"]
    assert len(seen) == len(BACKBONES)
    results = {r["backbone"]: r for _, r in find_results(sweep["root"])}
    for run in seen:
        backbone = run["config"]["backbone_name"]
        res = results[backbone]
        assert run["summary"]["test/top1"] == pytest.approx(res["metrics"]["test/top1"])
        assert run["summary"]["comparable"] is False and "limit_per_split" in run["summary"]["comparison/reasons"]
        for b in res["baselines"]:
            assert run["summary"][f"context/{b['label']}/{b['metric']}"] == b["value"]
        assert run["table"]["columns"][:2] == ["method", "arch"]
        assert [row[6] for row in run["table"]["data"]] == [res["metrics"]["test/top1"],
                                                            *(b["value"] for b in res["baselines"])]
        assert (run["group"], run["job_type"]) == ("digits", "knn")
        assert run["config"]["task_name"] == "digits" and run["config"]["protocol_name"] == "knn"


@pytest.mark.e2e
def test_report_over_the_sweep_shows_runs_and_baselines(sweep, tmp_path):
    out = tmp_path / "report"
    assert main([str(sweep["root"]), "--out", str(out), "--baselines", str(sweep["csv"])]) == 0
    md = (out / "report.md").read_text()
    section = md.split("## digits", 1)[1]
    for _, r in find_results(sweep["root"]):
        assert (f"| {r['backbone']} | this suite | {r['metrics']['test/top1']:.2f} @32px (not comparable: random "
                "weights, subset) |") in section
        assert "knn not comparable: task.limit_per_split=60" in section
    for b in baselines_for("digits", "knn", "test/top1", path=sweep["csv"]):
        assert f"| {b.method} ({b.arch}), knn | context | {b.value:.2f} |" in section
    # The linear row is context too, and its name says it is a linear-probe number.
    assert "| byol (resnet50), linear | context | 90.00 |" in section
    assert "| published |" not in section
    check_png(out / "charts" / "digits.png")
    page = (out / "report.html").read_text()
    assert 'src="data:image/png;base64,' in page and 'src="http' not in page


@pytest.mark.e2e
def test_online_without_network_falls_back_offline_and_writes_results(tmp_path, monkeypatch):
    import wandb

    run_dir = tmp_path / "run"
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    wandb.teardown()  # drop settings an earlier in-process run cached, so the variables above apply
    try:
        with pytest.warns(UserWarning, match="logging offline instead"):
            code = transfer.run.main([*TINY, "backbone=rs50", f"run.dir={run_dir}", f"run.root={tmp_path}",
                                      "logger.wandb.mode=online", "logger.wandb.init_timeout=2"])
    finally:
        wandb.teardown()
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 <= results["metrics"]["test/top1"] <= 100
    assert list((run_dir / "wandb").glob("offline-run-*")), "the fallback run was not saved offline"


def _write_run(root: Path, task: str, backbone: str, protocol: str, metrics: dict, stamp: str,
               primary: str | None = None, extra: dict | None = None, weights: str | dict = "pretrained",
               protocol_config: dict | None = None, folder: str | None = None) -> Path:
    run_dir = root / task / f"{backbone}-{folder or protocol}" / stamp
    run_dir.mkdir(parents=True)
    results = {"schema_version": SCHEMA_VERSION, "task": task, "backbone": backbone, "protocol": protocol,
               "weights": weights if isinstance(weights, dict) else {"source": weights}, "metrics": metrics,
               "counts": {}, "packages": {},
               "wall_time_s": 1.0, "primary_metric": primary, "extra": extra or {}}
    if protocol_config is not None:
        results["protocol_config"] = protocol_config
    path = write_results(run_dir, results)
    os.utime(path, (int(stamp), int(stamp)))  # the newest run of a cell is told by the file time
    return path


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    _write_run(root, "cifar100", "rs50", "linear", {"test/top1": 70.0, "test/top5": 90.0}, "1000", "test/top1")
    _write_run(root, "cifar100", "rs50", "linear", {"test/top1": 72.5, "test/top5": 91.0}, "2000", "test/top1",
               extra={"preprocess": "paper", "resolution": 224})
    _write_run(root, "cifar100", "rs101", "finetune", {"test/top1": 84.0}, "1500", "test/top1")
    _write_run(root, "cifar100", "resnet50", "linear", {"test/top1": 60.0}, "1700", "test/top1", weights="random")
    _write_run(root, "digits", "rs50", "knn", {"test/top1": 55.0, "test/mean_per_class": 54.0}, "1200")
    return root


def test_matrix_covers_backbones_tasks_protocols_with_packaged_baselines(runs, tmp_path):
    tasks, charts = write_report(runs, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    overview = md.split("## cifar100")[0]
    assert "cifar100 · finetune test/top1" in overview and "cifar100 · linear test/top1" in overview
    # No primary metric recorded for the digits run: every test metric gets a column.
    assert "digits · knn test/mean_per_class | digits · knn test/top1" in overview
    assert "| rs50 | — | 72.50 @224px (newest of 2) | 54.00 | 55.00 |" in overview  # the newest run's resolution
    assert "| rs101 | 84.00 | — | — | — |" in overview
    assert "| resnet50 | — | 60.00 (not comparable: random weights) | — | — |" in overview
    cifar = next(t for t in tasks if t.task == "cifar100")
    # Published: measured as the rs50 linear run (supervised, linear, the papers' preprocessing). Every other
    # cifar100 test/top1 row is context, shown once.
    published = [b for b in baselines_for("cifar100", "linear", "test/top1") if b.pretrain == "imagenet1k_supervised"]
    assert sorted(v for e in cifar.entries if e.kind == "published" for v in e.values.values()) == \
        sorted(b.value for b in published)
    assert sorted(v for e in cifar.entries if e.kind in ("published", "context") for v in e.values.values()) == \
        sorted(b.value for b in baselines_for("cifar100", metric="test/top1"))
    context = [e for e in cifar.entries if e.kind == "context"]
    assert all(e.name.endswith((", linear", ", finetune", ", scratch")) and "context, differs" in e.detail
               for e in context)
    assert all(e.source for e in cifar.entries)
    assert set(charts) == {"cifar100", "digits"}
    for path in charts.values():
        check_png(path)


def test_a_backbone_row_over_several_protocols_names_each_values_source_and_weights(tmp_path):
    """One row (the same weights: the same sha256), values from two results.json whose weights were read from two
    paths: both files and both weights are named, each with its protocol. Other weights are a row of their own."""
    root = tmp_path / "runs"
    digest = "ab" * 32
    linear = _write_run(root, "cifar100", "rs50", "linear", {"test/top1": 72.5}, "1000", "test/top1",
                        extra={"preprocess": "paper", "resolution": 224},
                        weights={"source": "file", "path": "/w/a.safetensors", "sha256": digest})
    knn = _write_run(root, "cifar100", "rs50", "knn", {"test/top1": 60.0}, "2000", "test/top1",
                     weights={"source": "file", "path": "/w/b.safetensors", "sha256": digest})
    other = _write_run(root, "cifar100", "rs50", "knn", {"test/top1": 30.0}, "3000", "test/top1", weights="random")
    tasks, _ = write_report(root, tmp_path / "out")
    rows = {e.name: e for e in tasks[0].entries if e.kind == "this suite"}
    assert sorted(rows) == ["rs50 [random]", f"rs50 [sha256 {digest[:10]}]"]
    row = rows[f"rs50 [sha256 {digest[:10]}]"]
    assert row.source == f"knn: {knn}; linear: {linear}"
    assert row.detail == (f"knn: source=file, path=/w/b.safetensors, sha256 {digest[:12]}; "
                          f"linear: source=file, path=/w/a.safetensors, sha256 {digest[:12]}")
    assert rows["rs50 [random]"].source == str(other) and rows["rs50 [random]"].detail == "source=random"
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"knn: {knn}; linear: {linear}" in md
    # A row whose values all come from one file keeps the plain text.
    single = _write_run(tmp_path / "one", "cifar100", "rs50", "linear", {"test/top1": 72.5}, "1000", "test/top1")
    (only,) = [e for e in build_comparison(find_results(tmp_path / "one"))[0].entries if e.kind == "this suite"]
    assert only.source == str(single) and only.detail == "source=pretrained"


def test_a_frozen_finetune_run_has_its_own_cell_and_never_hides_the_fine_tuned_one(tmp_path):
    """finetune with protocol.freeze_backbone=true (video, classification) is the finetune-frozen column: a newer
    frozen run neither replaces the fine-tuned score nor counts as one of its runs."""
    root = tmp_path / "runs"
    _write_run(root, "cifar100", "rs50", "finetune", {"test/top1": 84.0}, "1000", "test/top1",
               protocol_config={"freeze_backbone": False})
    _write_run(root, "cifar100", "rs50", "finetune", {"test/top1": 50.0}, "2000", "test/top1",
               protocol_config={"freeze_backbone": True}, folder="finetune-frozen")
    _write_run(root, "cifar100", "rs50", "finetune", {"test/top1": 51.0}, "3000", "test/top1",
               protocol_config={"freeze_backbone": True}, folder="finetune-frozen")
    (task,) = build_comparison(find_results(root))
    (row,) = [e for e in task.entries if e.kind == "this suite"]
    assert row.values[("finetune", "test/top1")] == 84.0 and row.runs["finetune"] == 1
    assert row.values[("finetune-frozen", "test/top1")] == 51.0 and row.runs["finetune-frozen"] == 2
    write_report(root, tmp_path / "out")
    overview = (tmp_path / "out" / "report.md").read_text().split("## cifar100")[0]
    assert "cifar100 · finetune test/top1" in overview and "cifar100 · finetune-frozen test/top1" in overview


@pytest.mark.parametrize("backbones", [1, 3])
def test_the_chart_title_fits_inside_the_figure(tmp_path, backbones):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from transfer.report import task_figure

    root = tmp_path / "runs"
    for i in range(backbones):
        _write_run(root, "fgvc_aircraft", f"rs{50 + i}", "linear", {"test/mean_per_class": 50.0 + i}, str(1000 + i),
                   "test/mean_per_class", extra={"preprocess": "paper", "resolution": 224})
    (task,) = build_comparison(find_results(root))
    fig = task_figure(task)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box = fig._suptitle.get_window_extent(canvas.get_renderer())
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width and 0 <= box.y0 and box.y1 <= fig.bbox.height, (box, fig.bbox)
    assert "fgvc_aircraft: runs here" in fig._suptitle.get_text()


def test_html_is_self_contained(runs, tmp_path):
    write_report(runs, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "<link" not in page and "<script" not in page


def test_wandb_report_has_one_panel_group_per_task(runs):
    pytest.importorskip("wandb_workspaces", reason="the W&B Report needs the optional wandb-workspaces package")
    import wandb_workspaces.reports.v2 as wr

    tasks = build_comparison(find_results(runs))
    report = build_wandb_report(tasks, entity="someone", project="proj", title="t")
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert len(grids) == len(tasks) == 2
    for t, grid in zip(tasks, grids):
        protocols = sorted({c.protocol for c in t.columns})
        assert [rs.name for rs in grid.runsets] == [f"{t.task} {p}" for p in protocols]
        assert all(f"Config('task_name') = '{t.task}'" in rs.filters for rs in grid.runsets)
        bars = [p for p in grid.panels if isinstance(p, wr.BarPlot)]
        assert [b.metrics for b in bars] == [[c.metric] for c in t.columns]


def test_wandb_report_offline_is_a_clear_error_after_the_local_report(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main([str(runs), "--out", str(tmp_path / "out"), "--wandb-report"]) == 2
    assert "needs W&B online" in capsys.readouterr().err
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "report.html").is_file()


@pytest.mark.parametrize("make, match", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "no results.json"),
    (lambda root: (root / "t" / "r").mkdir(parents=True) or (root / "t" / "r" / "results.json").write_text("{"),
     "results.json"),
])
def test_bad_runs_dir_fails_with_a_message(tmp_path, capsys, make, match):
    root = tmp_path / "runs"
    make(root)
    assert main([str(root)]) == 2
    assert match in capsys.readouterr().err
