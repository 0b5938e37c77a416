import json

import pytest
import torch

from transfer.errors import DataError
from video.data import ClipSpec, TrainClips, collate_skipping, load_split, read_manifest
from video.multiview import MultiViewClips, ViewScores, collate_views, uniform_starts
from video.scan import main as scan_main
from video.synthetic import LAYOUT_WRITERS, MISSING_ID, write_dataset
from video.transforms import MultiCropEval, build_train_transform

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SPEC = ClipSpec(frames=8, stride=2, fps=8)  # 2 s at 8 fps: the whole synthetic video


@pytest.fixture(scope="module", params=LAYOUT_WRITERS)
def dataset(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, write_dataset(root, request.param, classes=3, per_class=2)


def test_layout_lists_videos_and_missing(dataset):
    layout, root = dataset
    listed = load_split(root, "train", layout=layout)
    assert len(listed.classes) == 3
    assert len(listed.videos) == 3 * 2 + 1  # the undecodable file exists, so it is listed
    assert len(listed.missing) == 1 and MISSING_ID in listed.missing[0]
    assert sorted({label for _, label in listed.videos}) == [0, 1, 2]


def test_scan_reports_bad_files_and_manifest_reads_back(dataset, tmp_path):
    layout, root = dataset
    assert scan_main([str(root), "--out", str(tmp_path), "--split", "train", "--split", "val"]) == 0
    report = json.loads((tmp_path / "train.report.json").read_text())
    assert report["decodable"] == 6
    assert len(report["missing"]) == 1 and len(report["undecodable"]) == 1
    assert "badvid" in report["undecodable"][0][0]
    manifest = read_manifest(tmp_path, "val")
    assert len(manifest.videos) == 6 and len(manifest.undecodable) == 1 and len(manifest.missing) == 1


def test_train_clips_skip_undecodable(dataset):
    layout, root = dataset
    listed = load_split(root, "train", layout=layout)
    tf = build_train_transform(size=24, mean=MEAN, std=STD, crop="resized")
    clips = TrainClips(listed.videos, SPEC, tf)
    samples = [clips[i] for i in range(len(clips))]
    batch = collate_skipping(samples)
    assert int(batch["skipped"]) == 1
    assert batch["video"].shape == (6, 3, 8, 24, 24)  # (B, C, T, H, W)


def test_multiview_items_and_padding(dataset):
    layout, root = dataset
    listed = load_split(root, "val", layout=layout)
    views = MultiViewClips(listed.videos, SPEC, MultiCropEval(size=24, mean=MEAN, std=STD, crops=3), clips=2)
    views.pad(4)
    assert len(views) % 4 == 0 and len(views) >= 2 * len(listed.videos)
    batch = collate_views([views[i] for i in range(len(views))])
    assert int(batch["skipped"]) == 2  # both temporal clips of the undecodable video
    assert batch["video"].shape == (12, 3, 3, 8, 24, 24)  # (B, S, C, T, H, W)


def test_missing_root_names_the_layouts(tmp_path):
    with pytest.raises(DataError, match="folders:"):
        load_split(tmp_path, "train")


def test_transform_is_identical_over_frames():
    frames = torch.randint(0, 255, (1, 3, 40, 48), dtype=torch.uint8).repeat(8, 1, 1, 1)  # a static clip
    out = build_train_transform(size=24, mean=MEAN, std=STD, crop="jitter", jitter=(30, 40),
                                randaugment=(2, 9))(frames)
    assert out.shape == (3, 8, 24, 24)
    assert torch.equal(out[:, :1].expand_as(out), out)


def test_uniform_starts_cover_the_video():
    starts = uniform_starts(10.0, 2.0, 5)
    assert starts[0] == 0 and starts[-1] == 8.0 and len(starts) == 5


def test_view_scores_average_probabilities():
    scores = ViewScores([0, 1], num_classes=3)
    logits = torch.tensor([[[5.0, 0, 0], [0, 5.0, 0]], [[0, 0, 5.0], [0, 0, 5.0]]])  # (B=2, S=2, K=3)
    scores.update(logits, torch.tensor([0, 1]))
    scores.update(torch.tensor([[[9.0, 0, 0]]]), torch.tensor([0]))
    metrics, unseen = scores.metrics("test", top_k=(1, 3))
    assert unseen == 0 and metrics["test/top1"] == 50.0 and metrics["test/top3"] == 100.0
    assert scores.views.tolist() == [3, 2]
