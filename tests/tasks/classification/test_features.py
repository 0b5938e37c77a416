"""The feature cache is keyed on everything that determines features and labels; labels read from it are
checked; images that fail to decode are counted, even in loader workers; non-finite features are refused."""
from __future__ import annotations

import io
import json
import logging
import shutil

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_networks import TINY_RS, register_tiny_entries

from tasks.classification.datasets import DATASETS, Transformed
from tasks.classification.features import (
    SplitFeatures,
    cache_key,
    cache_path,
    extract,
    extract_split,
    read_cache,
    write_cache,
)
from tasks.classification.task import eval_transform, feature_key, preprocess_of
from transfer.backbones import build_backbone
from transfer.config import compose, validate
from transfer.errors import TransferError
from transfer.image_sources import FileImages
from transfer.run import main as run_main
from transfer.tasks import RunContext

COMMON = ["backbone=rs50", "backbone.weights=random", "task.resolution=32", "trainer.precision=32-true",
          "trainer.num_workers=0", "trainer.eval_batch_size=8", "trainer.progress_bar=false",
          "logger.wandb.mode=disabled", "task.max_bad_fraction=0.2", "task.check_split_sizes=false"]


def run(tmp_path, name: str, *overrides: str) -> dict:
    run_dir = tmp_path / name
    assert run_main([*COMMON, f"run.dir={run_dir}", f"run.cache_dir={tmp_path / 'cache'}", *overrides]) == 0
    return json.loads((run_dir / "results.json").read_text())


def truncated_jpeg(label_colour: int) -> bytes:
    """A real JPEG cut in half, as an interrupted download leaves it: its header still parses."""
    buf = io.BytesIO()
    im = np.random.default_rng(label_colour).integers(0, 60, (96, 96, 3)).astype(np.uint8)
    im[..., label_colour] += 180
    Image.fromarray(im).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    assert len(data) > 4000  # mostly entropy-coded data: the cut falls in it, after the header
    return data[: len(data) // 2]


@pytest.mark.e2e
def test_label_column_change_re_extracts_and_scores_right(tmp_path, saved_to_disk):
    # A CIFAR-100-style copy probed with the coarse labels first, then with the fine ones: the second run used
    # to read the cached coarse labels back (100 %, or "index out of bounds" in the other order).
    task = ["task=cifar100", f"task.data_dir={saved_to_disk}", "protocol=linear", "protocol.l2_steps=5"]
    coarse = run(tmp_path, "coarse", *task, "task.label_column=coarse_label")
    fine = run(tmp_path, "fine", *task, "task.label_column=fine_label")
    fresh = run(tmp_path, "fresh", *task, "task.label_column=fine_label", "protocol.cache=false")
    assert coarse["counts"]["feature_cache_hits"] == 0 and fine["counts"]["feature_cache_hits"] == 0
    assert fine["metrics"] == fresh["metrics"]
    again = run(tmp_path, "again", *task, "task.label_column=fine_label")
    assert again["counts"]["feature_cache_hits"] == 3 and again["metrics"] == fresh["metrics"]


@pytest.mark.e2e
def test_moved_files_re_extract_and_score_right(tmp_path, image_folder, facts):
    classes, _ = facts
    task = ["task=oxford_pets", f"task.data_dir={image_folder}", "protocol=knn", "protocol.k=3"]
    before = run(tmp_path, "before", *task)
    test = image_folder / "test"
    for i in range(2):  # two test images "moved to their correct class folder"
        shutil.move(test / classes[0] / f"{i:03d}.png", test / classes[1] / f"m{i}.png")
    after = run(tmp_path, "after", *task)
    fresh = run(tmp_path, "fresh", *task, "protocol.cache=false")
    assert before["counts"]["feature_cache_hits"] == 0 and after["counts"]["feature_cache_hits"] == 0
    assert after["metrics"] == fresh["metrics"]
    # Same files, newer modification time: the data's identity changed too, so nothing stale is reused.
    (image_folder / "train" / classes[2] / "000.png").touch()
    assert run(tmp_path, "touched", *task)["counts"]["feature_cache_hits"] == 0


def test_cached_labels_are_checked_against_the_split(tmp_path, caplog):
    key = cache_key(backbone="rs50", dataset="toy", split="test")
    path = cache_path(tmp_path, key)
    split = SplitFeatures(torch.randn(4, 8), torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 3, 4]))
    write_cache(path, key, split)
    hit = read_cache(path, key, np.array([0, 1, 9, 1, 2]))
    assert hit is not None and hit.cache_hit and torch.equal(hit.labels, split.labels)
    with caplog.at_level(logging.WARNING):
        assert read_cache(path, key, np.array([0, 1, 9, 2, 2])) is None  # one label changed under the same key
        assert read_cache(path, key, np.array([0, 1, 1])) is None  # fewer images than the cache points to
    assert "1 of 4 cached labels differ" in caplog.text and "outside the split" in caplog.text


@pytest.fixture
def cifar_ctx(tmp_path, saved_to_disk):
    def make(*overrides: str) -> RunContext:
        cfg = validate(compose(["task=cifar100", f"task.data_dir={saved_to_disk}", *COMMON, *overrides]))
        return RunContext(cfg=cfg, run_dir=tmp_path / "run", logger=None)
    return make


def test_preprocessing_and_precision_change_the_cache_key(cifar_ctx, monkeypatch):
    ctx = cifar_ctx("protocol=linear")
    assert preprocess_of(ctx.cfg) == "paper"  # compared with the SimCLR/BYOL/ssl-transfer linear rows
    assert preprocess_of(cifar_ctx("protocol=knn").cfg) == "paper"
    assert preprocess_of(cifar_ctx("protocol=finetune").cfg) == "checkpoint"
    assert preprocess_of(cifar_ctx("protocol=linear", "task.preprocess=checkpoint").cfg) == "checkpoint"
    splits = DATASETS.get("cifar100")(ctx.cfg.task)
    register_tiny_entries(monkeypatch)  # after the composes: the config recipes never see the test entries
    backbone = build_backbone(TINY_RS.name, weights="random")  # rs50's network at one block per stage

    def key(preprocess: str, dtype) -> dict:
        return feature_key(ctx, backbone, splits, "test", transform=eval_transform(backbone, 32, preprocess),
                           resolution=32, preprocess=preprocess, dtype=dtype)

    keys = [key("paper", None), key("checkpoint", None), key("paper", torch.bfloat16)]
    assert len({json.dumps(k, sort_keys=True) for k in keys}) == 3
    assert len({cache_path(ctx.cache_dir, k) for k in keys}) == 3
    assert keys[0]["preprocess"] == "paper" and keys[2]["precision"] == "torch.bfloat16"
    paper = eval_transform(backbone, 224, "paper")
    assert "Resize(size=224, interpolation=bicubic" in repr(paper) and "CenterCrop(size=(224, 224))" in repr(paper)


def test_paper_preprocessing_is_refused_for_finetune(tmp_path, capsys):
    code = run_main([*COMMON, "task=digits", "protocol=finetune", "task.preprocess=paper", f"run.dir={tmp_path / 'r'}"])
    assert code == 2 and "task.preprocess=paper applies to the frozen protocols" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_truncated_jpeg_is_counted_across_loader_workers(tmp_path, tiny_entries):
    paths, labels = [], []
    for i in range(5):
        path = tmp_path / f"{i}.jpg"
        if i == 2:
            path.write_bytes(truncated_jpeg(1))
        else:
            Image.new("RGB", (20, 20), (50 * i, 0, 0)).save(path, format="JPEG")
        paths.append(str(path))
        labels.append(i % 2)
    backbone = build_backbone(TINY_RS.name, weights="random")  # rs50's network at one block per stage
    data = Transformed(FileImages(paths, labels), eval_transform(backbone, 32))
    out = extract(backbone, data, batch_size=2, num_workers=1, device=torch.device("cpu"), dtype=None,
                  channels_last=False, desc="test")
    assert out.undecodable == [paths[2]]  # decoded in a worker process, counted in this one
    assert out.kept.tolist() == [0, 1, 3, 4] and out.labels.tolist() == [0, 1, 1, 0]
    assert out.features.shape == (4, backbone.num_features)


def test_non_finite_features_are_refused(tmp_path, tiny_entries):
    backbone = build_backbone(TINY_RS.name, weights="random")  # rs50's network at one block per stage
    with torch.no_grad():
        backbone.model.bn1.weight[0] = float("inf")  # an fp16-overflow-like activation blow-up
    data = Transformed(_Colours(3), eval_transform(backbone, 32))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        use_distributed_sampler=False, default_root_dir=str(tmp_path))
    with pytest.raises(TransferError, match="non-finite"):
        extract_split(trainer, backbone, data, directory=tmp_path / "shards",
                      key=cache_key(backbone="rs50", dataset="toy", split="test"),
                      expected_labels=np.zeros(3, np.int64), batch_size=2, num_workers=0, channels_last=False,
                      desc="features test")
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing cached


class _Colours(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.labels = np.zeros(n, np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return Image.new("RGB", (20, 20), (40 * i, 90, 10)), 0


@pytest.mark.e2e
def test_truncated_jpeg_is_skipped_counted_and_stops_a_run_past_the_limit(tmp_path, image_folder, facts, capsys):
    classes, _ = facts
    bad = image_folder / "test" / classes[2] / "cut.jpg"
    bad.write_bytes(truncated_jpeg(2))
    task = ["task=oxford_pets", f"task.data_dir={image_folder}", "protocol=knn", "protocol.k=3", "protocol.cache=false"]
    results = run(tmp_path, "ok", *task)
    assert results["counts"]["skipped_images"] == 1  # the corrupt PNG the header scan finds
    assert results["counts"]["undecodable_images"] == 1  # the truncated JPEG, found when decoded
    assert results["counts"]["images_test"] == 10 and results["counts"]["images_test_scored"] == 9
    # 2 bad of 28 images is above 6 %; the header scan alone (1 of 28) is not.
    code = run_main([*COMMON, *task, "task.max_bad_fraction=0.06", f"run.dir={tmp_path / 'over'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "undecodable" in err and "task.max_bad_fraction=0.06" in err
    assert not (tmp_path / "over" / "results.json").exists()
