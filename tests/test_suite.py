"""Named suites: the recipes, the command line, every run checked first, failures listed at the end, and the
report's table (rows = backbones, columns = the suite's columns, published numbers beside them)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from nyu_export import write_png_export
from omegaconf import OmegaConf
from suite_helpers import run_cli
from test_report import check_png

from transfer.baselines import baselines_for
from transfer.config import RECIPES_DIR
from transfer.errors import ConfigError
from transfer.registry import UnknownNameError
from transfer.report import build_wandb_report, find_results
from transfer.report import main as report_main
from transfer.results import SCHEMA_VERSION, write_results
from transfer.suite import expand, load_suite, parse_request, run_suite, suite_names
from transfer.suite_report import CONTEXT_MARK, build_suite_table, rows_of

DEMO = """\
name: demo_dense
title: Digits and NYU depth
source: a test fixture
columns:
  - {id: digits_linear, task: digits, protocol: linear, metric: test/top1, title: Digits linear}
  - {id: nyu_depth_frozen, task: nyu_depth, protocol: frozen, metric: test/delta1, title: NYU frozen, data_dir: nyu}
  - id: nyu_depth_finetune
    task: nyu_depth
    protocol: finetune
    metric: test/delta1
    title: NYU fine-tuned
    data_dir: nyu
"""
DIGITS_ONLY = """\
name: digits_pair
columns:
  - {id: digits_linear, task: digits, protocol: linear, metric: test/top1}
  - {id: digits_knn, task: digits, protocol: knn, metric: test/top1}
"""


def _suite_file(tmp_path: Path, text: str = DEMO, name: str = "demo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", suite_names())
def test_every_suite_recipe_loads_and_each_column_is_a_task_protocol_and_metric_of_its_adapter(name):
    suite = load_suite(name)
    assert suite.name == name and suite.title and suite.source and suite.columns
    for col in suite.columns:
        recipe = OmegaConf.load(RECIPES_DIR / "task" / f"{col.task}.yaml")
        if recipe.adapter == "classification":  # the column shows the metric the task's recipe reports
            assert col.metric == f"test/{recipe.metric}", col.id


def test_resnet_rs_table5_has_ten_columns_five_tasks_frozen_and_fine_tuned():
    suite = load_suite("resnet_rs_table5")
    assert len(suite.columns) == 10  # "outperform SimCLR on 5/10 downstream tasks" (Bello et al. 2021, §7.4)
    tasks = {c.task for c in suite.columns}
    assert tasks == {"cifar100", "voc_detection", "voc_semseg", "ade20k", "nyu_depth"}
    for task in tasks:
        protocols = sorted(c.protocol for c in suite.columns if c.task == task)
        assert protocols == (["finetune", "linear"] if task == "cifar100" else ["finetune", "frozen"])


def test_ssl_transfer12_is_the_papers_eleven_suite_data_sets_linear_and_fine_tuned():
    suite = load_suite("ssl_transfer12")
    order = ["food101", "cifar10", "cifar100", "birdsnap", "sun397", "stanford_cars", "fgvc_aircraft", "dtd",
             "oxford_pets", "caltech101", "flowers102"]  # SimCLR Table 8 column order, VOC2007 left out
    assert [c.task for c in suite.columns] == order * 2
    assert [c.protocol for c in suite.columns] == ["linear"] * 11 + ["finetune"] * 11
    for col in suite.columns:  # each column has published numbers to stand beside (SimCLR / BYOL tables)
        assert baselines_for(col.task, col.protocol, col.metric), col.id


@pytest.mark.parametrize("text, match", [
    (DIGITS_ONLY.replace("protocol: knn", "protocol: frozen"), "protocol 'frozen' does not apply to task 'digits'"),
    (DIGITS_ONLY.replace("metric: test/top1}\n  - {id: digits_knn", "metric: test/miou}\n  - {id: digits_knn"),
     "reports no metric 'test/miou'"),
    (DIGITS_ONLY.replace("digits_knn", "digits_linear"), "must be unique"),
    (DIGITS_ONLY.replace("protocol: knn,", "protocol: knn, overrides: [backbone=rs50],"), "may not set"),
    (DIGITS_ONLY + "colour: blue\n", "not valid"),
])
def test_a_malformed_suite_names_the_problem(text, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        load_suite(str(_suite_file(tmp_path, text)))


def test_an_unknown_suite_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match=r"Did you mean 'resnet_rs_table5'.*ssl_transfer12"):
        load_suite("resnet_rs_table")


def test_command_line_picks_columns_sets_per_column_keys_and_sweeps_backbones(tmp_path):
    path = _suite_file(tmp_path)
    request = parse_request([f"suite={path}", "backbone=rs50,resnet50", f"suite.data_root={tmp_path}",
                             "suite.only=[digits,nyu_depth_frozen]", "suite.nyu_depth.task.crop=[32,48]",
                             "suite.digits_linear.task.resolution=32", "trainer.num_workers=0"])
    assert [c.id for c in request.columns] == ["digits_linear", "nyu_depth_frozen"]
    jobs = expand(request, multirun=True)
    assert [j.label for j in jobs] == ["digits_linear backbone=rs50", "nyu_depth_frozen backbone=rs50",
                                       "digits_linear backbone=resnet50", "nyu_depth_frozen backbone=resnet50"]
    assert jobs[1].overrides == ["task=nyu_depth", "protocol=frozen", f"task.data_dir={tmp_path / 'nyu'}",
                                 "backbone=rs50", "trainer.num_workers=0", "task.crop=[32,48]"]
    assert jobs[0].overrides[-1] == "task.resolution=32" and "task.crop=[32,48]" not in jobs[0].overrides
    skipped = parse_request([f"suite={path}", "suite.skip=[nyu_depth]"])
    assert [c.id for c in skipped.columns] == ["digits_linear"]


@pytest.mark.parametrize("args, match", [
    (["task=cifar100"], "sets task and protocol for each column"),
    (["suite.only=[nope]"], r"\['nope'\] name no column"),
    (["suite.nope.task.crop=[1,2]"], "suite.<column id or task>.<key>=value"),
    (["suite.skip=[digits,nyu_depth]"], "leave no column"),
])
def test_bad_suite_keys_are_refused(args, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        parse_request([f"suite={_suite_file(tmp_path)}", *args])


def test_every_run_is_checked_before_the_first_starts(tmp_path, capsys):
    from transfer.run import main

    root = tmp_path / "runs"
    code = main([f"suite={_suite_file(tmp_path)}", "-m", "backbone=rs50,resnet50", f"run.root={root}",
                 "logger.wandb.mode=disabled"])
    err = capsys.readouterr().err
    assert code == 2 and "4 of 6 runs cannot start; nothing was run" in err
    # one entry for the two NYU columns and both backbones, with the layout and how to pass the copy
    assert err.count("task.data_dir=PATH, a local NYU Depth v2 copy") == 1
    assert "nyu_depth_frozen, nyu_depth_finetune (backbone=resnet50; backbone=rs50)" in err
    assert "pass suite.data_root=DIR or suite.nyu_depth.task.data_dir=PATH" in err
    assert not root.exists()


def test_cfg_lists_the_runs_of_a_suite(tmp_path, capsys):
    from transfer.run import main

    assert main(["--cfg", "suite=resnet_rs_table5", "backbone=resnet50", "suite.only=[cifar100]"]) == 0
    out = capsys.readouterr().out
    assert "suite resnet_rs_table5: 2 runs" in out
    assert "python -m transfer.run task=cifar100 protocol=linear backbone=resnet50" in out


def test_a_failing_run_does_not_stop_the_suite_and_is_listed_at_the_end(tmp_path, capsys):
    done = []

    def run_one(overrides, *, sweep_index=None):
        if "protocol=linear" in overrides and "backbone=resnet50" in overrides:
            raise RuntimeError("CUDA out of memory")
        done.append(overrides)
        return {"task": "digits", "backbone": "x", "protocol": "knn", "metrics": {"test/top1": 1.0},
                "run_dir": str(tmp_path)}

    code = run_suite([f"suite={_suite_file(tmp_path, DIGITS_ONLY)}", "backbone=rs50,resnet50"], multirun=True,
                     show=False, run_one=run_one)
    captured = capsys.readouterr()
    assert code == 1 and len(done) == 3  # the three other runs went ahead
    assert "unexpected RuntimeError; the suite continues" in captured.err
    assert "suite digits_pair: 3 of 4 runs finished, 1 failed." in captured.out
    assert "failed: digits_linear backbone=resnet50: RuntimeError: CUDA out of memory" in captured.out


def _write_run(root: Path, task: str, backbone: str, protocol: str, metrics: dict, stamp: int, *,
               extra: dict | None = None, weights: str = "pretrained", status: str = "complete") -> None:
    run_dir = root / task / f"{backbone}-{protocol}" / str(stamp)
    run_dir.mkdir(parents=True)
    lower = [k for k in metrics if k in ("test/rms", "test/rel")]
    path = write_results(run_dir, {"schema_version": SCHEMA_VERSION, "task": task, "backbone": backbone,
                                   "protocol": protocol, "weights": {"source": weights}, "metrics": metrics,
                                   "counts": {}, "packages": {}, "wall_time_s": 1.0, "extra": extra or {},
                                   "status": status, "lower_is_better": lower, "protocol_config": {}})
    os.utime(path, (stamp, stamp))


@pytest.fixture
def table5_runs(tmp_path):
    root = tmp_path / "runs"
    paper = {"preprocess": "paper", "resolution": 224}
    _write_run(root, "cifar100", "resnet50", "linear", {"test/top1": 70.0}, 1000, extra=paper)
    _write_run(root, "cifar100", "resnet50", "linear", {"test/top1": 77.0}, 2000, extra=paper)
    _write_run(root, "cifar100", "rs50", "linear", {"test/top1": 75.0}, 1500, weights="random")
    _write_run(root, "nyu_depth", "resnet50", "finetune", {"test/delta1": 82.0, "test/rms": 0.55}, 1600,
               extra={"head": "fcrn"})
    _write_run(root, "nyu_depth", "resnet50", "frozen", {}, 1700, status="failed")
    return root


def test_table_puts_backbones_in_rows_columns_in_the_papers_order_and_published_numbers_beside(table5_runs):
    suite = load_suite("resnet_rs_table5")
    table = build_suite_table(find_results(table5_runs), suite)
    head, rows = rows_of(table)
    assert head[2:12] == [f"{c.title} ({c.metric})" for c in suite.columns]
    by_name = {(r[0], r[1]): r for r in rows}
    resnet, rs50 = by_name["resnet50", "this suite"], by_name["rs50", "this suite"]
    assert resnet[2] == "77.00 (newest of 2)" and resnet[3] == "—" and resnet[10] == "failed"
    assert resnet[11] == "82.00"
    assert rs50[2] == "75.00 *" and rs50[11] == "—"  # random weights under a linear probe: not comparable
    # Published, measured as the resnet50 linear run (supervised pretraining, the papers' preprocessing): plain.
    assert by_name["supervised_simclr_baseline (resnet50)", "published"][2] == "78.30"
    # Measured otherwise (self-supervised pretraining): marked.
    assert by_name["byol (resnet50)", "published"][2] == f"78.40 {CONTEXT_MARK}"
    # NYU fine-tuned: BYOL Table 4(b)'s supervised row is comparable with the supervised run.
    assert by_name["supervised (resnet50)", "published"][11] == "81.10"
    assert rows.index(resnet) < rows.index(by_name["supervised (resnet50)", "published"])  # runs first
    # A published row sits in its own column only: the frozen columns have none.
    assert all(r[10] == "—" for r in rows if r[1] == "published")


def test_wandb_report_starts_with_the_suite_table(table5_runs):
    pytest.importorskip("wandb_workspaces", reason="the W&B Report needs the optional wandb-workspaces package")
    import wandb_workspaces.reports.v2 as wr

    from transfer.report import build_comparison

    found = find_results(table5_runs)
    suite = load_suite("resnet_rs_table5")
    table = build_suite_table(found, suite)
    report = build_wandb_report(build_comparison(found), entity="someone", project="proj", title="t", suite=table)
    heading, markdown, grid = report.blocks[1:4]
    assert isinstance(heading, wr.H1) and isinstance(markdown, wr.MarkdownBlock) and isinstance(grid, wr.PanelGrid)
    assert "77.00 (newest of 2)" in markdown.text
    assert [rs.name for rs in grid.runsets] == [c.id for c in suite.columns]
    assert "Config('protocol_name') = 'frozen'" in grid.runsets[8].filters
    assert [p.metrics for p in grid.panels] == [[c.metric] for c in suite.columns]


@pytest.mark.e2e
def test_suite_on_digits_and_nyu_depth_runs_two_backbones_and_the_report_shows_the_table(tmp_path):
    suite_path = _suite_file(tmp_path)
    write_png_export(tmp_path / "nyu")  # the demo suite reads <data_root>/nyu
    root = tmp_path / "runs"
    out = run_cli(f"suite={suite_path}", "-m", "backbone=rs50,resnet50", f"suite.data_root={tmp_path}",
                  "backbone.weights=random", "logger.wandb.mode=disabled", "trainer.num_workers=0",
                  "trainer.progress_bar=false", f"run.root={root}",
                  "suite.digits.task.resolution=32", "suite.digits.task.limit_per_split=60",
                  "suite.nyu_depth.task.input_scale=1.0", "suite.nyu_depth.task.crop=[32,48]",
                  "suite.nyu_depth.task.decoder_channels=[32,16,16,8,8]",
                  "suite.nyu_depth.task.expected_test_images=null", "suite.nyu_depth.trainer.max_steps=1",
                  "suite.nyu_depth.trainer.batch_size=2", "suite.nyu_depth.trainer.eval_batch_size=2",
                  cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "suite demo_dense: 6 of 6 runs finished, 0 failed." in out.stdout
    found = {(r["task"], r["backbone"], r["protocol"]): (p, r) for p, r in find_results(root)}
    assert set(found) == {(t, b, p) for b in ("rs50", "resnet50")
                          for t, p in (("digits", "linear"), ("nyu_depth", "frozen"), ("nyu_depth", "finetune"))}
    for backbone in ("rs50", "resnet50"):  # frozen runs have their own folder
        path, frozen = found["nyu_depth", backbone, "frozen"]
        assert path.parent.parent.name == f"{backbone}-frozen" and frozen["recipe"]["freeze_backbone"] is True
        assert set(frozen["lower_is_better"]) == {"test/rel", "test/sq_rel", "test/rms", "test/rms_log", "test/log10"}
        assert found["nyu_depth", backbone, "finetune"][1]["recipe"]["freeze_backbone"] is False

    report = tmp_path / "report"
    assert report_main([str(root), "--suite", str(suite_path), "--out", str(report)]) == 0
    md = (report / "report.md").read_text()
    table = md.split("## Digits and NYU depth", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| backbone / published | kind | Digits linear (test/top1) | NYU frozen (test/delta1) "
                               "| NYU fine-tuned (test/delta1) |")
    for backbone in ("rs50", "resnet50"):
        row = next(line for line in lines if line.startswith(f"| {backbone} | this suite |"))
        cells = [c.strip() for c in row.split("|")[3:6]]
        expected = [found[key][1]["metrics"][m] for key, m in (
            (("digits", backbone, "linear"), "test/top1"), (("nyu_depth", backbone, "frozen"), "test/delta1"),
            (("nyu_depth", backbone, "finetune"), "test/delta1"))]
        assert [c.split()[0] for c in cells] == [f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:.3f}"
                                                 for v in expected]
        assert all(c.endswith("*") for c in cells)  # random weights, a 60-image / 7-frame copy: not comparable
    # BYOL Table 4(b)'s delta1 rows stand in the fine-tuned NYU column, marked: no run here was measured that way.
    published = {line.split("|")[1].strip(): line.split("|")[5].strip() for line in lines if "| published |" in line}
    assert published == {"supervised (resnet50)": f"81.10 {CONTEXT_MARK}",
                         "simclr_byol_repro (resnet50)": f"83.30 {CONTEXT_MARK}",
                         "byol (resnet50)": f"84.60 {CONTEXT_MARK}"}
    assert "features of an untrained network" in table  # the reasons are listed under the table
    check_png(report / "charts" / "suite_demo_dense.png")
    page = (report / "report.html").read_text()
    assert "<h2>Digits and NYU depth</h2>" in page and page.count("data:image/png;base64,") == 3


def test_report_with_an_unknown_suite_is_one_line(table5_runs, capsys):
    assert report_main([str(table5_runs), "--suite", "resnet_rs_tabel5"]) == 2
    assert "Did you mean 'resnet_rs_table5'" in capsys.readouterr().err


def test_run_labels_show_what_the_sweep_varies(tmp_path):
    request = parse_request([f"suite={_suite_file(tmp_path, DIGITS_ONLY)}", "backbone=rs50", "trainer.seed=0,1"])
    labels = [j.label for j in expand(request, multirun=True)]
    assert labels == ["digits_linear backbone=rs50 trainer.seed=0", "digits_knn backbone=rs50 trainer.seed=0",
                      "digits_linear backbone=rs50 trainer.seed=1", "digits_knn backbone=rs50 trainer.seed=1"]


def test_suite_keys_without_a_suite_ask_for_one(capsys):
    from transfer.run import main

    assert main(["suite.data_root=/data", "backbone=rs50"]) == 2
    assert "name one suite: suite=NAME (one of resnet_rs_table5, ssl_transfer12)" in capsys.readouterr().err


def test_suite_precheck_flags_missing_segmentation_folders(tmp_path, capsys):
    """Segmentation refuses a missing task.data_dir in validate (as detection and depth do), so the suite's
    pre-check names its columns instead of a run failing after its run directory exists."""
    from transfer.run import main

    code = main(["--cfg", "suite=resnet_rs_table5", "backbone=rs50", f"suite.data_root={tmp_path / 'empty'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    for columns in ("voc_semseg_frozen, voc_semseg_finetune", "ade20k_frozen, ade20k_finetune",
                    "voc_detection_frozen, voc_detection_finetune", "nyu_depth_frozen, nyu_depth_finetune"):
        assert f"- {columns} (backbone=rs50): task.data_dir=" in err, err
