"""NYU depth: metrics on known cases, the decoder, both on-disk sources, and runs through ``python -m transfer.run``."""
from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from suite_helpers import run_cli

from tasks.depth.config import DepthTaskConfig
from tasks.depth.data import DepthFrames, collate_counting, h5py_available, load_splits
from tasks.depth.metrics import EIGEN_CROP, METRIC_NAMES, berhu_loss, depth_errors, eval_mask, scale_crop
from tasks.depth.model import FastUpConv
from tasks.depth.task import check_train_frames, not_comparable
from transfer.errors import DataError
from transfer.run import main

NO_H5PY = "h5py is not installed here; the labelled NYU .mat release (MATLAB v7.3 = HDF5) can only be read with it"


def _errors(pred, gt, **kw) -> dict[str, float]:
    gt = torch.tensor(gt, dtype=torch.float32)
    mask = eval_mask(gt, min_depth=1e-3, max_depth=10.0, crop=None)
    out = depth_errors(torch.tensor(pred, dtype=torch.float32), gt, mask, min_depth=1e-3, max_depth=10.0)
    return dict(zip(METRIC_NAMES, out.tolist()))


def test_perfect_prediction_has_delta1_of_100_and_no_error():
    gt = [[1.0, 2.0], [4.0, 9.5]]
    e = _errors(gt, gt)
    assert e["delta1"] == e["delta2"] == e["delta3"] == 100.0
    assert e["rel"] == e["sq_rel"] == e["rms"] == e["rms_log"] == e["log10"] == 0.0


def test_constant_prediction_matches_the_hand_computation():
    # gt 1, 2, 4 m and a constant 2 m prediction: ratios 2, 1, 2.
    e = _errors([[2.0, 2.0, 2.0]], [[1.0, 2.0, 4.0]])
    assert e["delta1"] == pytest.approx(100 / 3) and e["delta2"] == pytest.approx(100 / 3)  # 2 > 1.25**2 = 1.5625
    assert e["delta3"] == pytest.approx(100 / 3)  # 2 > 1.25**3 = 1.953
    assert e["rel"] == pytest.approx((1 / 1 + 0 + 2 / 4) / 3)
    assert e["sq_rel"] == pytest.approx((1 / 1 + 0 + 4 / 4) / 3)
    assert e["rms"] == pytest.approx(math.sqrt((1 + 0 + 4) / 3))
    assert e["log10"] == pytest.approx(2 * math.log10(2) / 3)
    assert e["rms_log"] == pytest.approx(math.sqrt(2 * math.log(2) ** 2 / 3))


def test_eigen_crop_and_depth_cap_select_the_scored_pixels():
    gt = torch.full((480, 640), 3.0)
    gt[100, 100] = 0.0  # no measurement
    gt[200, 200] = 12.0  # beyond the 10 m cap
    mask = eval_mask(gt, min_depth=1e-3, max_depth=10.0)
    assert int(mask.sum()) == (471 - 45) * (601 - 41) - 2
    assert not mask[44, 300] and mask[45, 300] and mask[470, 600] and not mask[471, 600] and not mask[300, 601]



def test_eigen_crop_at_half_size_keeps_half_its_rows_and_columns():
    # A 240 x 320 export: the 426 x 560 crop becomes 213 x 280, rows 22-234 and columns 20-299 (pixel centres
    # mapped back onto the 480 x 640 frame). Python's round() gave rows 22-235 (214: round(22.5) = 22 but
    # round(235.5) = 236).
    half = eval_mask(torch.full((240, 320), 3.0), min_depth=1e-3, max_depth=10.0)
    assert int(half.sum()) == 213 * 280
    rows, cols = half.any(1).nonzero().flatten(), half.any(0).nonzero().flatten()
    assert (int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])) == (22, 234, 20, 299)
    assert scale_crop(EIGEN_CROP, (480, 640), (480, 640)) == EIGEN_CROP  # the frame's own size: unchanged
    assert scale_crop(EIGEN_CROP, (480, 640), (120, 160)) == (11, 118, 10, 150)  # 10.75 -> 11, 117.25 -> 118


def test_prediction_is_clipped_to_the_cap_before_scoring():
    e = _errors([[50.0, 0.0]], [[9.0, 0.5]])  # 50 m -> 10 m, 0 m -> 1e-3 m
    assert e["rel"] == pytest.approx((1 / 9 + (0.5 - 1e-3) / 0.5) / 2)


def test_berhu_is_l1_below_c_and_scaled_l2_above():
    gt = torch.zeros(5)
    pred = torch.tensor([0.5, -1.0, 2.0, 5.0, 0.0])  # c = 0.2 * 5 = 1
    expected = [0.5, 1.0, (4 + 1) / 2, (25 + 1) / 2, 0.0]
    assert float(berhu_loss(pred, gt, torch.ones(5, dtype=torch.bool))) == pytest.approx(sum(expected) / 5)
    assert float(berhu_loss(pred, gt, torch.zeros(5, dtype=torch.bool))) == 0.0


def test_fast_up_convolution_equals_zero_insertion_and_a_5x5_convolution():
    torch.manual_seed(0)
    up = FastUpConv(3, 2)
    kernel = torch.randn(2, 3, 5, 5)
    rows = {0: [0, 2, 4], 1: [1, 3]}  # output phase 0 sees input rows i-1..i+1, phase 1 rows i..i+1
    with torch.no_grad():
        for conv, (a, b) in zip(up.phases, [(0, 0), (0, 1), (1, 0), (1, 1)]):
            conv.weight.copy_(kernel[:, :, rows[a]][:, :, :, rows[b]])
    x = torch.randn(1, 3, 5, 7)
    zeros = torch.zeros(1, 3, 10, 14)
    zeros[..., ::2, ::2] = x
    expected = torch.nn.functional.conv2d(zeros, kernel, padding=2)
    torch.testing.assert_close(up(x), expected)


def test_png_export_reads_millimetres_and_refuses_8_bit_depth(tmp_path, nyu):
    root = nyu.write_png_export(tmp_path, train=2, test=2)
    task = DepthTaskConfig(name="nyu_depth", data_dir=str(root), source="png", expected_test_images=None)
    reader, train, test = load_splits(task, root)
    image, depth = reader.read(test.items[0])
    _, expected = nyu.frame(1000)
    assert image.shape == (48, 64, 3) and np.allclose(depth, np.round(expected * 1000) / 1000)
    Image.fromarray((expected * 10).astype(np.uint8)).save(test.items[1][1])  # an 8-bit export
    with pytest.raises(DataError, match="16-bit greyscale"):
        load_splits(task, root)


def test_8_bit_training_depth_is_caught_by_the_scan_and_named(tmp_path, nyu):
    # Only the test split is decoded in the scan; the depth format is checked in every split's header, so an
    # 8-bit training export stops at the scan instead of being skipped frame by frame in training.
    root = nyu.write_png_export(tmp_path, train=4, test=2)
    depth0 = root / (root / "train.txt").read_text().splitlines()[0].split()[1]
    Image.fromarray(np.full((48, 64), 3, np.uint8)).save(depth0)
    task = DepthTaskConfig(name="nyu_depth", data_dir=str(root), max_bad_fraction=0.5, expected_test_images=None)
    _, train, test = load_splits(task, root)
    assert train.skipped["not_16bit_depth"] == 1 and len(train.items) == 3
    assert str(depth0) not in [d for _, d in train.items]
    assert any(str(depth0) in e and "is a L image" in e for e in train.examples)
    assert test.skipped["not_16bit_depth"] == 0
    task.max_bad_fraction = 0.1
    with pytest.raises(DataError, match=r"NYU train split.*1 of 4 frames.*not_16bit_depth': 1.*is a L image"):
        load_splits(task, root)


def corrupt_png_data(path) -> None:
    """Scramble a PNG's compressed pixels but keep every chunk's CRC valid: the header and ``verify()`` pass
    (what the scan checks for training frames), decoding fails ("broken data stream")."""
    data, out, i = path.read_bytes(), bytearray(path.read_bytes()[:8]), 8
    while i < len(data):
        n, kind = struct.unpack(">I", data[i:i + 4])[0], data[i + 4:i + 8]
        body = data[i + 8:i + 8 + n]
        if kind == b"IDAT":
            body = bytes(b ^ 0x5A for b in body)
        out += struct.pack(">I", n) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        i += 12 + n
    path.write_bytes(bytes(out))


def test_training_frames_that_fail_to_decode_count_against_the_limit(tmp_path, nyu):
    root = nyu.write_png_export(tmp_path, train=4, test=2)
    lines = (root / "train.txt").read_text().splitlines()
    for line in lines[:2]:
        corrupt_png_data(root / line.split()[1])
    task = DepthTaskConfig(name="nyu_depth", data_dir=str(root), crop=[32, 48], input_scale=1.0,
                           max_bad_fraction=0.5, expected_test_images=None)
    reader, train, _ = load_splits(task, root)  # the scan passes: headers and CRCs are intact
    assert len(train.items) == 4 and sum(train.skipped.values()) == 0
    frames = DepthFrames(train.items, reader, task, mean=(0.5,) * 3, std=(0.5,) * 3, train=True)
    batch = collate_counting([frames[i] for i in range(4)])
    assert batch["skipped"] == 2 and batch["failed"].tolist() == [0, 1] and len(batch["image"]) == 2
    check_train_frames(task, train, reader, [0, 1])  # 2 of 4 = the limit: training goes on
    task.max_bad_fraction = 0.25
    with pytest.raises(DataError, match=r"2 of 4 frames are unusable.*2 failed to decode during training.*"
                                        r"broken data stream"):
        check_train_frames(task, train, reader, [0, 1])


@pytest.mark.e2e
def test_a_run_whose_training_frames_all_fail_stops_with_its_counts(tmp_path, nyu, monkeypatch):
    # Every training frame passes the scan and fails to decode: the run must fail (exit 2), not train zero steps
    # and report the untrained decoder's test scores as complete.
    root = nyu.write_png_export(tmp_path / "data", train=2, test=2)
    for line in (root / "train.txt").read_text().splitlines():
        corrupt_png_data(root / line.split()[1])
    run_dir = tmp_path / "run"
    code = main(["task=nyu_depth", f"task.data_dir={root}", "trainer.max_steps=2", f"run.dir={run_dir}", *nyu.FAST])
    assert code == 2
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and results["metrics"] == {}
    assert results["counts"]["train/frames_failed_decode"] == 2 and results["counts"]["train/images"] == 2
    assert "2 failed to decode during training" in results["error"]
    # Even with the frame limit out of the way, a run whose every step had an empty batch fails (Lightning
    # counts those steps in global_step; before, such a run reported status complete).
    import tasks.depth.task as depth_task

    monkeypatch.setattr(depth_task, "check_train_frames", lambda *args: None)
    code = main(["task=nyu_depth", f"task.data_dir={root}", "trainer.max_steps=2", f"run.dir={tmp_path / 'run2'}",
                 *nyu.FAST])
    assert code == 2
    results = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert results["status"] == "failed" and results["metrics"] == {}
    assert "no training step of this run had data" in results["error"]


def test_damaged_frames_are_counted_and_the_limit_holds(tmp_path, nyu):
    root = nyu.write_png_export(tmp_path, train=4, test=3)
    lines = (root / "train.txt").read_text().splitlines()
    rgb0, depth1 = lines[0].split()[0], lines[1].split()[1]
    (root / rgb0).write_bytes(b"\xff\xd8 broken")
    (root / depth1).unlink()
    task = DepthTaskConfig(name="nyu_depth", data_dir=str(root), max_bad_fraction=0.5, expected_test_images=None)
    _, train, _ = load_splits(task, root)
    assert train.skipped == {"missing": 1, "unreadable": 1, "size_mismatch": 0, "not_16bit_depth": 0}
    assert len(train.items) == 2
    task.max_bad_fraction = 0.1
    with pytest.raises(DataError, match=r"2 of 4 frames.*Expected layout"):
        load_splits(task, root)


def test_a_copy_in_no_known_layout_names_both(tmp_path):
    with pytest.raises(DataError, match=r"(?s)nyu_depth_v2_labeled.mat.*splits.mat.*16-bit"):
        load_splits(DepthTaskConfig(name="nyu_depth", data_dir=str(tmp_path)), tmp_path)


def test_a_mat_file_that_is_not_matlab_v73_is_refused(tmp_path):
    (tmp_path / "nyu_depth_v2_labeled.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 200)
    with pytest.raises(DataError, match="not a MATLAB v7.3"):
        load_splits(DepthTaskConfig(name="nyu_depth", data_dir=str(tmp_path)), tmp_path)


@pytest.mark.skipif(not h5py_available(), reason=NO_H5PY)
def test_mat_release_reads_frames_in_image_orientation_and_the_official_split(tmp_path, nyu):
    root = nyu.write_mat_release(tmp_path)
    task = DepthTaskConfig(name="nyu_depth", data_dir=str(root), expected_test_images=None)
    reader, train, test = load_splits(task, root)
    assert test.items == [1, 3, 5] and train.items == [0, 2, 4, 6] and train.source == "mat"
    image, depth = reader.read(3)
    exp_image, exp_depth = nyu.frame(2003)
    np.testing.assert_array_equal(image, exp_image)
    np.testing.assert_allclose(depth, exp_depth)


@pytest.mark.parametrize("kwargs, steps, batch, expected", [
    ({}, 7500, 256, []),
    ({}, 2, 256, ["trained 2 steps at global batch 256"]),
    ({"limit_per_split": 3}, 7500, 256, ["task.limit_per_split=3"]),
    ({"expected_test_images": None}, 7500, 256, ["expected_test_images=null"]),
])
def test_depth_runs_off_the_published_protocol_say_why(kwargs, steps, batch, expected, tmp_path):
    from types import SimpleNamespace

    task = DepthTaskConfig(name="nyu_depth", data_dir=str(tmp_path), **kwargs)
    test = SimpleNamespace(items=list(range(654)))
    reasons = not_comparable(task, None, test, steps=steps, batch=batch).get("not_comparable", [])
    assert len(reasons) == len(expected) and all(e in r for e, r in zip(expected, reasons)), reasons
    short = not_comparable(DepthTaskConfig(name="nyu_depth"), None, SimpleNamespace(items=[0, 1]), steps=7500,
                           batch=256)["not_comparable"]
    assert short == ["the test split has 2 frames, not the official 654"]


@pytest.mark.e2e
def test_nyu_depth_png_end_to_end_then_resume(tmp_path, nyu):
    root = nyu.write_png_export(tmp_path / "data")
    run_dir = tmp_path / "run"
    out = run_cli("task=nyu_depth", f"task.data_dir={root}", "trainer.max_steps=2", f"run.dir={run_dir}", *nyu.FAST,
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["primary_metric"] == "test/delta1" and results["task"] == "nyu_depth"
    assert set(results["metrics"]) == {f"test/{m}" for m in METRIC_NAMES}
    assert 0 <= results["metrics"]["test/delta1"] <= 100 and results["metrics"]["test/rms"] >= 0
    assert results["counts"]["test/frames_scored"] == 3 and results["counts"]["train/images"] == 4
    assert results["recipe"]["lr"] == pytest.approx(0.16 * 2 / 256)  # scaled to the batch of 2
    assert results["protocol_config"] == {"name": "finetune", "lr": 0.16, "lr_reference_batch": 256,
                                          "weight_decay": 5e-4, "momentum": 0.9, "nesterov": False, "steps": 7500,
                                          "warmup_fraction": 0.05, "freeze_backbone": False}
    assert results["recipe"]["steps"] == 2 and results["recipe"]["freeze_backbone"] is False
    assert results["counts"]["train/frames_failed_decode"] == 0 and results["counts"]["train/skipped_frames"] == 0
    assert results["extra"]["global_step"] == 2 and results["extra"]["resumed_from"] is None
    # resume=true continues the finished run from its last checkpoint for a longer schedule (a changed
    # trainer.max_steps needs resume_allow_changes=true): steps 3-4 only.
    code = main(["task=nyu_depth", f"task.data_dir={root}", "trainer.max_steps=4", f"run.dir={run_dir}",
                 "resume=true", "resume_allow_changes=true", *nyu.FAST])
    assert code == 0
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["extra"]["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert resumed["extra"]["global_step"] == 4 and resumed["extra"]["first_epoch_this_process"] >= 1


@pytest.mark.e2e
def test_resuming_a_run_killed_during_its_test_goes_straight_to_the_test(tmp_path, png_root, nyu):
    # A run whose training had finished but whose test never wrote results.json (killed during the test pass):
    # resume=true skips Lightning's fit loop (on_train_start never runs), and the zero-data check read that as
    # "every step of this run was empty" and failed the run (exit 2). It must test the last checkpoint instead, with
    # the scores of the run that was never interrupted.
    import shutil

    args = ["task=nyu_depth", f"task.data_dir={png_root}", "protocol=frozen", "protocol.steps=2", *nyu.FAST]
    run_dir, copy = tmp_path / "run", tmp_path / "copy"
    assert main([*args, f"run.dir={run_dir}"]) == 0
    done = json.loads((run_dir / "results.json").read_text())
    shutil.copytree(run_dir, copy)
    (copy / "results.json").unlink()
    assert main([*args, f"run.dir={copy}", "resume=true"]) == 0
    resumed = json.loads((copy / "results.json").read_text())
    assert resumed["status"] == "complete" and resumed["extra"]["global_step"] == 2
    assert resumed["extra"]["resumed_from"] == str(copy / "checkpoints" / "last.ckpt")
    assert resumed["metrics"].keys() == done["metrics"].keys()
    for key, value in done["metrics"].items():
        assert resumed["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert resumed["counts"] == done["counts"]


@pytest.mark.e2e
def test_a_frozen_run_trains_the_decoder_only_and_says_so(tmp_path, png_root, nyu):
    # protocol.freeze_backbone=true is protocol=frozen; the final weights show which batch norms saw training
    # batches (a fresh BN counts 0, one in train mode counts every forward).
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    assert main(["task=nyu_depth", f"task.data_dir={png_root}", "trainer.max_steps=2", "protocol.freeze_backbone=true",
                 "protocol.lr=0.08", f"run.dir={run_dir}", *nyu.FAST]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["protocol"] == "frozen" and results["protocol_config"]["lr"] == 0.08
    assert "freeze_backbone" not in results["protocol_config"] and results["recipe"]["freeze_backbone"] is True
    assert results["recipe"]["lr"] == pytest.approx(0.08 * 2 / 256)
    weights = load_file(run_dir / "checkpoints" / "final.safetensors")
    tracked = {k: int(v) for k, v in weights.items() if k.endswith("num_batches_tracked")}
    backbone = {v for k, v in tracked.items() if k.startswith("model.backbone.")}
    decoder = {v for k, v in tracked.items() if k.startswith("model.decoder.")}
    assert backbone == {0} and decoder == {2}


@pytest.mark.e2e
@pytest.mark.skipif(not h5py_available(), reason=NO_H5PY)
def test_nyu_depth_mat_release_end_to_end(tmp_path, nyu):
    root = nyu.write_mat_release(tmp_path / "data")
    results_dir = tmp_path / "run"
    assert main(["task=nyu_depth", f"task.data_dir={root}", "trainer.max_steps=1", f"run.dir={results_dir}",
                 *nyu.FAST]) == 0
    results = json.loads((results_dir / "results.json").read_text())
    assert results["recipe"]["source"] == "mat" and results["counts"]["test/frames_scored"] == 3


@pytest.mark.e2e
def test_two_processes_score_every_test_frame_once(tmp_path, nyu):
    root = nyu.write_png_export(tmp_path / "data", train=4, test=3)  # 3 frames on 2 ranks: one is repeated
    run_dir = tmp_path / "run"
    args = [a for a in nyu.FAST if not a.startswith("logger.")]
    out = run_cli("task=nyu_depth", f"task.data_dir={root}", "trainer.max_steps=1", "trainer.devices=2",
                  "trainer.accelerator=cpu", "trainer.eval_batch_size=1", "logger.wandb.mode=offline",
                  f"run.dir={run_dir}", *args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["counts"]["test/frames_scored"] == 3 and results["counts"]["test/frames_not_seen"] == 0
    assert results["recipe"]["global_batch"] == 4
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1, "only rank 0 logs to W&B"
