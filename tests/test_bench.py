"""The backbone sheet: arguments, measurements, table and plot."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from tiny_networks import meta_parameter_count
from torch import nn

from transfer import bench
from transfer.backbones import BACKBONES, build_backbone
from transfer.errors import ConfigError
from transfer.registry import UnknownNameError

# One entry per distinct ResNet-RS network (several entries share a network and differ only in weights).
RESNET_RS = list({(s.arch, repr(s.arch_kwargs)): s.name for s in map(BACKBONES.get, reversed(BACKBONES.names()))
                  if s.family == "resnet_rs"}.values())
# Parameter counts (millions, with the ImageNet classifier) from timm results/results-imagenet.csv
# (huggingface/pytorch-image-models @aa4b585), as collected in the project's reference notes.
TIMM_PUBLISHED_PARAMS_M = {"resnetrs50": 35.69, "resnetrs101": 63.62, "resnetrs152": 86.62, "resnetrs200": 93.21,
                           "resnetrs270": 129.86, "resnetrs350": 163.96, "resnetrs420": 191.89}


def tiny_classifier() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, bench.NUM_CLASSES))


@pytest.mark.e2e
def test_bench_command_writes_table_csv_and_plot(tmp_path, capsys):
    names = ["rs50", "resnet50"]
    code = bench.main([f"backbone={','.join(names)}", "bench.resolution=32", "bench.batch_sizes=[1,2]",
                       "bench.repeats=1", "bench.warmup=0", "bench.train_batch=2", f"bench.out={tmp_path}"])
    assert code == 0
    md = (tmp_path / "backbone_sheet.md").read_text()
    assert md.count("\n") == 2 + len(names)
    assert "fp32 b2 (ms)" in md and "half b1 (ms)" in md
    with open(tmp_path / "backbone_sheet.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["backbone"] for r in rows] == names
    for row in rows:
        spec = BACKBONES.get(row["backbone"])
        assert int(row["resolution"]) == 32
        assert float(row["top1_published"]) == spec.top1
        assert float(row["gmacs"]) > 0 and float(row["fp32_b1_ms"]) > 0 and float(row["half_b2_ms"]) > 0
        assert 1 <= int(row["train_batch"]) <= 2
    assert (tmp_path / "backbone_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sheet = json.loads((tmp_path / "backbone_sheet.json").read_text())
    assert sheet["machine"]["device"] == "cpu" and len(sheet["rows"]) == 2
    assert "backbone=rs50,resnet50" in sheet["command"]
    captured = capsys.readouterr()
    assert "| rs50 |" in captured.out
    assert "[1/2] rs50 at 32 px" in captured.err and "[2/2] resnet50 at 32 px" in captured.err  # progress


@pytest.mark.parametrize("name", RESNET_RS)
def test_resnet_rs_parameter_count_matches_timm(name):
    spec = BACKBONES.get(name)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        ours = bench.count_parameters(build_backbone(name, weights="random", keep_classifier=True).model)
    assert ours == meta_parameter_count(spec.arch, **spec.arch_kwargs)  # timm's network (built once per session)
    if spec.arch in TIMM_PUBLISHED_PARAMS_M:
        assert ours / 1e6 == pytest.approx(TIMM_PUBLISHED_PARAMS_M[spec.arch], abs=0.005)


def test_resnet_rs_flops_grow_with_resolution():
    with torch.device("meta"):
        model = build_backbone("rs50", weights="random", keep_classifier=True).model
        small, large = (bench.count_flops(model, r, torch.device("meta")) for r in (64, 128))
    assert 3.5 < large / small <= 4.0  # convolutions scale with pixels; the classifier does not


def test_count_flops_of_one_convolution():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    macs = 8 * 3 * 3 * 3 * 32 * 32  # out channels x in channels x kernel area x output pixels
    assert bench.count_flops(conv, 32, torch.device("cpu")) == 2 * macs


def test_train_step_halves_the_batch_until_it_fits(monkeypatch):
    tried = []

    def fits(model, resolution, batch):
        tried.append(batch)
        return batch <= 2

    monkeypatch.setattr(bench, "_fits_cpu", fits)
    batch, seconds = bench.train_step_latency(tiny_classifier(), resolution=16, start_batch=8,
                                              device=torch.device("cpu"), warmup=0, repeats=1)
    assert (batch, tried) == (2, [8, 4, 2])
    assert seconds > 0


def test_train_step_reports_none_when_nothing_fits(monkeypatch):
    monkeypatch.setattr(bench, "_fits_cpu", lambda model, resolution, batch: False)
    assert bench.train_step_latency(tiny_classifier(), resolution=16, start_batch=4, device=torch.device("cpu"),
                                    warmup=0, repeats=1) == (None, None)


def test_cpu_memory_plan_depends_on_free_memory(monkeypatch):
    model = tiny_classifier()
    monkeypatch.setattr(bench, "_available_memory", lambda: 1 << 40)
    assert bench._fits_cpu(model, 16, 128)
    monkeypatch.setattr(bench, "_available_memory", lambda: 1 << 10)
    assert not bench._fits_cpu(model, 16, 1)


def test_inference_latency_half_precision_on_cpu_is_bf16():
    model = tiny_classifier().to(bench.half_dtype(torch.device("cpu")))
    assert next(model.parameters()).dtype == torch.bfloat16
    seconds = bench.inference_latency(model, resolution=16, batch=2, dtype=torch.bfloat16,
                                      device=torch.device("cpu"), warmup=0, repeats=3)
    assert seconds > 0


def test_parse_config_reads_key_values():
    cfg = bench.parse_config(["backbone=rs152", "bench.batch_sizes=[1,4]", "bench.repeats=3", "bench.resolution=64",
                              "bench.train_batch=0"])
    assert cfg.backbone == "rs152"
    assert (cfg.bench.batch_sizes, cfg.bench.repeats, cfg.bench.resolution, cfg.bench.train_batch) == ([1, 4], 3, 64, 0)
    assert [s.name for s in bench.select_backbones("all")] == BACKBONES.names()


@pytest.mark.parametrize("argv, fragment", [
    (["bench.repeat=2"], "bench.repeats"),
    (["bench.repeats=x"], "bench.repeats"),
    (["bench.batch_sizes=[0]"], "positive"),
    (["bench.precisions=[fp8]"], "fp32"),
    (["bench.resolution=8"], "32"),
    (["bench.train_batch=-1"], "128"),
    (["bench.device=tpu"], "auto, cpu, cuda"),
    (["bench.threads=0"], "positive"),
    (["rs152"], "key=value"),
])
def test_bad_arguments_name_the_fix(argv, fragment):
    with pytest.raises(ConfigError) as err:
        bench.parse_config(argv)
    assert fragment in str(err.value)


def test_unknown_backbone_lists_closest_name(capsys):
    with pytest.raises(UnknownNameError) as err:
        bench.parse_config(["backbone=rs51"])
    assert err.value.closest == "rs50"
    assert bench.main(["backbone=rs50,rs51"]) == 2
    assert "Did you mean 'rs50'" in capsys.readouterr().err


def test_table_marks_missing_values_and_plot_skips_them(tmp_path):
    rows = [{"backbone": "a", "family": "f", "resolution": 32, "params_m": 1.5, "gmacs": 0.25,
             "top1_published": 80.0, "train_batch": None, "train_step_s": None, "fp32_b1_ms": 12.5},
            {"backbone": "b", "family": "f", "resolution": 32, "params_m": 2.0, "gmacs": 0.5,
             "top1_published": None, "train_batch": 2, "train_step_s": 0.5, "fp32_b1_ms": 20.0}]
    md = bench.markdown_table(rows).splitlines()
    assert md[0].startswith("| backbone | family | res | params (M)") and "fp32 b1 (ms)" in md[0]
    assert md[2].split(" | ")[6] == "—" and md[3].split(" | ")[5] == "—"
    assert bench.csv_text(rows).splitlines()[0].split(",")[-1] == "fp32_b1_ms"
    bench.plot(rows, tmp_path / "p.png", machine="test")
    assert (tmp_path / "p.png").stat().st_size > 0
