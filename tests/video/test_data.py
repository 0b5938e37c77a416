import json
import os

import pytest
import torch

from transfer.errors import DataError
from video.data import (
    ClipSpec,
    TrainClips,
    VideoList,
    check_bad_fraction,
    collate_skipping,
    find_split,
    load_split,
    read_manifest,
)
from video.multiview import MultiViewClips, ViewScores, collate_views, uniform_starts
from video.scan import main as scan_main
from video.synthetic import LAYOUT_WRITERS, MISSING_ID, write_dataset, write_video
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
    assert report["decodable"] == 6 and report["listed"] == 8
    assert len(report["missing"]) == 1 and len(report["undecodable"]) == 1
    assert "badvid" in report["undecodable"][0][0]
    manifest = read_manifest(tmp_path, "val")
    assert len(manifest.videos) == 6 and len(manifest.undecodable) == 1 and len(manifest.missing) == 1
    assert all(os.path.isfile(p) for p, _ in manifest.videos)


def test_manifest_written_in_one_directory_works_from_another(tmp_path, monkeypatch):
    write_dataset(tmp_path / "here" / "k400", "csv", classes=2, per_class=2)
    monkeypatch.chdir(tmp_path / "here")
    assert scan_main(["k400", "--out", "manifest", "--split", "train"]) == 0  # a relative data root
    stored = json.loads((tmp_path / "here" / "manifest" / "train.manifest.json").read_text())
    assert all(not os.path.isabs(p) for p, _ in stored["videos"])  # relative to the data root
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    listed = load_split(None, "train", manifest=tmp_path / "here" / "manifest")
    assert len(listed.videos) == 4 and all(os.path.isfile(p) for p, _ in listed.videos)
    # The data moves: task.data_dir names the new root, the manifest still applies.
    (tmp_path / "here" / "k400").rename(tmp_path / "moved")
    listed = load_split(tmp_path / "moved", "train", manifest=tmp_path / "here" / "manifest")
    assert len(listed.videos) == 4 and all(str(tmp_path / "moved") in p for p, _ in listed.videos)
    # A root under which none of the manifest's videos exists is an error naming that root.
    with pytest.raises(DataError, match="none exists under"):
        load_split(elsewhere, "train", manifest=tmp_path / "here" / "manifest")


def test_class_folders_read_every_container_and_report_other_files(tmp_path):
    split = tmp_path / "train"
    for i, suffix in enumerate([".mp4", ".webm", ".mkv", ".mov", ".avi", ".MP4"]):
        codec = "libvpx-vp9" if suffix == ".webm" else "mpeg4"
        write_video(split / ("abseiling" if i % 2 else "air drumming") / f"v{i}{suffix}", codec=codec, seconds=0.5)
    (split / "abseiling" / "v9.mp4.part").write_bytes(b"partial download")
    (split / "abseiling" / ".DS_Store").write_bytes(b"")
    listed = load_split(tmp_path, "train")
    assert find_split(tmp_path, "train")[0] == "folders"
    assert sorted(os.path.basename(p) for p, _ in listed.videos) == ["v0.mp4", "v1.webm", "v2.mkv", "v3.mov",
                                                                       "v4.avi", "v5.MP4"]
    assert listed.classes == ["abseiling", "air drumming"]
    assert [os.path.basename(p) for p in listed.unsupported] == ["v9.mp4.part"]
    assert listed.counts("train")["train/unsupported"] == 1
    clips = TrainClips(listed.videos, ClipSpec(frames=2, stride=1, fps=8), transform=lambda x: x)
    assert all(isinstance(clips[i], dict) for i in range(len(clips)))  # every container decodes


@pytest.mark.parametrize("variant", ["bom+crlf+quotes", "is_cc column", "spaces"])
def test_official_csv_resaved_by_spreadsheets_is_the_official_layout(tmp_path, variant):
    names = {"abseiling": "-abc123_000010_000020", "air drumming": "xyz_789_000000_000010"}
    for name in names.values():
        write_video(tmp_path / "val" / f"{name}.mp4", seconds=0.5)
    rows = [("abseiling", "-abc123", 10, 20), ("air drumming", "xyz_789", 0, 10)]
    if variant == "bom+crlf+quotes":  # Excel's "CSV UTF-8": byte-order mark, CRLF, every field quoted
        text = '\ufeff"label","youtube_id","time_start","time_end","split"\r\n' + "".join(
            f'"{lab}","{vid}","{s}","{e}","val"\r\n' for lab, vid, s, e in rows)
    elif variant == "is_cc column":  # Kinetics-700-2020 and the K400 re-release add is_cc
        text = "label,youtube_id,time_start,time_end,split,is_cc\n" + "".join(
            f"{lab},{vid},{s},{e},val,0\n" for lab, vid, s, e in rows)
    else:
        text = "label, youtube_id, time_start, time_end, split\n" + "".join(
            f'"{lab}", {vid}, {s}.0, {e}.0, val\n' for lab, vid, s, e in rows)
    (tmp_path / "val.csv").write_bytes(text.encode("utf-8"))
    assert find_split(tmp_path, "val")[0] == "csv"
    listed = load_split(tmp_path, "val")
    assert listed.classes == ["abseiling", "air drumming"] and not listed.missing
    assert sorted(os.path.basename(p) for p, _ in listed.videos) == sorted(f"{n}.mp4" for n in names.values())


def test_path_list_with_bom_crlf_and_spaces_in_paths(tmp_path):
    write_video(tmp_path / "videos_val" / "a clip.mp4", seconds=0.5)
    write_video(tmp_path / "videos_val" / "b.webm", codec="libvpx-vp9", seconds=0.5)
    (tmp_path / "videos_val" / "c.txt").write_text("not a video")
    (tmp_path / "val.txt").write_bytes("\ufeffa clip.mp4 1\r\nb.webm 0\r\nc.txt 1\r\n\r\ngone.mp4 1\r\n".encode())
    listed = load_split(tmp_path, "val")
    assert [(os.path.basename(p), lab) for p, lab in listed.videos] == [("a clip.mp4", 1), ("b.webm", 0)]
    assert len(listed.missing) == 1 and len(listed.unsupported) == 1


def test_bad_fraction_names_every_count():
    listed = VideoList([("a.mp4", 0)] * 8, ["x"], missing=["m.mp4"], undecodable=["u.mp4"])
    check_bad_fraction("val", listed, 0.25, failed=[])  # 2 of 10
    with pytest.raises(DataError, match=r"3 of 10 videos are unusable \(1 missing, 1 undecodable in the scan, "
                                        r"0 with an unsupported suffix, 1 failed to decode during the run\)"):
        check_bad_fraction("val", listed, 0.25, failed=["a.mp4"])


def test_train_clips_report_undecodable_videos(dataset):
    layout, root = dataset
    listed = load_split(root, "train", layout=layout)
    tf = build_train_transform(size=24, mean=MEAN, std=STD, crop="resized")
    clips = TrainClips(listed.videos, SPEC, tf, short_side=32)
    batch = collate_skipping([clips[i] for i in range(len(clips))])
    bad = [i for i, (p, _) in enumerate(listed.videos) if "badvid" in p]
    assert batch["failed"].tolist() == bad
    assert batch["video"].shape == (6, 3, 8, 24, 24)  # (B, C, T, H, W)


def test_multiview_items_padding_and_failures(dataset):
    layout, root = dataset
    listed = load_split(root, "val", layout=layout)
    views = MultiViewClips(listed.videos, SPEC, MultiCropEval(size=24, mean=MEAN, std=STD, crops=3), clips=2,
                           short_side=24)
    views.pad(4)
    assert len(views) % 4 == 0 and len(views) >= 2 * len(listed.videos)
    batch = collate_views([views[i] for i in range(len(views))])
    bad = next(i for i, (p, _) in enumerate(listed.videos) if "badvid" in p)
    assert batch["failed"].tolist() == [bad, bad]  # both temporal clips of the undecodable video
    assert batch["video"].shape == (12, 3, 3, 8, 24, 24)  # (B, S, C, T, H, W)
    scores = ViewScores([lab for _, lab in listed.videos], num_classes=3)
    scores.fail(batch["failed"])
    scores.update(torch.zeros(12, 3, 3), batch["index"])
    assert scores.failed_videos() == [bad]
    assert scores.metrics("test")[1] == 1  # one video without any view


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


def test_decode_failure_counts_survive_a_checkpoint():
    from video.config import VideoFinetuneProtocolConfig
    from video.module import VideoModule, ema_decay_at

    def module():
        return VideoModule(torch.nn.Linear(2, 2), VideoFinetuneProtocolConfig(), eval_labels=[0], train_videos=5,
                           global_batch=2, check_train=lambda failed: None)

    before = module()
    before.failures.add(torch.tensor([1, 3, 3, 1]))
    before.failures.epoch_end(lambda t: t)
    checkpoint = {}
    before.on_save_checkpoint(checkpoint)
    after = module()
    after.on_load_checkpoint(checkpoint)
    assert after.failures.failed.nonzero().flatten().tolist() == [1, 3] and after.failures.skipped == 4
    # Model Garden's EMA warm-up: 0.1 at the first update, the set decay once (1 + n) / (10 + n) exceeds it.
    assert ema_decay_at(0.9999, 0.0, True) == pytest.approx(0.1) and ema_decay_at(0.9999, 1e6, True) == 0.9999
    assert ema_decay_at(0.9999, 0.0, False) == 0.9999


@pytest.mark.parametrize("layout", ["folders", "csv"])
def test_splits_scanned_apart_share_the_training_class_list(tmp_path, layout):
    """train holds classes a, b, c; val only b and c. Scanned one split at a time, val's manifest lists its own two
    classes (b=0, c=1); the run maps them by name to train's indices (b=1, c=2). A val class train lacks is an
    error naming it."""
    from video.config import VideoTaskConfig
    from video.task import _load

    root = tmp_path / "data"
    rows = {"train": ["class_a", "class_b", "class_c"], "val": ["class_c", "class_b"]}
    for split, names in rows.items():
        lines = ["label,youtube_id,time_start,time_end,split"]
        for c, name in enumerate(names):
            vid = f"{split[:2]}{name[-1]}"
            rel = f"{name}/{vid}_000000_000002.mp4" if layout == "folders" else f"{vid}_000000_000002.mp4"
            write_video(root / split / rel, seconds=0.5, seed=c)
            lines.append(f"{name},{vid},0,2,{split}")
        if layout == "csv":
            (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "manifest"
    for split in ("val", "train"):  # two separate scans, val first
        assert scan_main([str(root), "--out", str(out), "--split", split]) == 0
    assert json.loads((out / "val.manifest.json").read_text())["classes"] == ["class_b", "class_c"]
    train, val = _load(VideoTaskConfig(name="k", manifest=str(out)))
    assert train.classes == val.classes == ["class_a", "class_b", "class_c"]
    labels = {os.path.basename(p)[:3]: lab for p, lab in val.videos}
    assert labels == {"vab": 1, "vac": 2}
    # A class only val holds has no label in train's list.
    if layout == "folders":
        os.rename(root / "val" / "class_b", root / "val" / "class_z")
    else:
        (root / "val.csv").write_text((root / "val.csv").read_text().replace("class_b,", "class_z,"))
    assert scan_main([str(root), "--out", str(out), "--split", "val"]) == 0
    with pytest.raises(DataError, match=r"classes \['class_z'\] .* not among the 3 classes of the training split"):
        _load(VideoTaskConfig(name="k", manifest=str(out)))


def test_symlink_farms_are_followed_in_every_layout(tmp_path):
    """Kinetics copies are often links into the real storage: a linked class folder, a linked sub-folder, a linked
    video file are all read; a link loop is read once; a link to nothing is a missing video."""
    store = tmp_path / "store"
    for name in ("a0", "b0", "b1", "c0"):
        write_video(store / f"{name}_000000_000002.mp4", seconds=0.5)
    root = tmp_path / "data"
    (root / "train" / "class_a").mkdir(parents=True)
    (root / "train" / "class_a" / "a0_000000_000002.mp4").symlink_to(store / "a0_000000_000002.mp4")  # a file
    (store / "b").mkdir()
    for name in ("b0", "b1"):
        (store / "b" / f"{name}_000000_000002.mp4").symlink_to(store / f"{name}_000000_000002.mp4")
    (root / "train" / "class_b").symlink_to(store / "b", target_is_directory=True)  # a class folder
    (store / "c").mkdir()
    (store / "c" / "c0_000000_000002.mp4").symlink_to(store / "c0_000000_000002.mp4")
    (root / "train" / "class_a" / "more").symlink_to(store / "c", target_is_directory=True)  # a sub-folder
    (root / "train" / "class_a" / "loop").symlink_to(root / "train" / "class_a", target_is_directory=True)
    (root / "train" / "class_a" / "gone_000000_000002.mp4").symlink_to(store / "gone.mp4")
    listed = load_split(root, "train", layout="folders")
    names = sorted((os.path.basename(p)[:2], lab) for p, lab in listed.videos)
    assert names == [("a0", 0), ("b0", 1), ("b1", 1), ("c0", 0)]
    assert [os.path.basename(p) for p in listed.missing] == ["gone_000000_000002.mp4"]
    # The official CSV layout finds its videos through a linked split folder and linked files.
    csv_root = tmp_path / "csv"
    csv_root.mkdir()
    (csv_root / "train").symlink_to(root / "train", target_is_directory=True)
    (csv_root / "train.csv").write_text("label,youtube_id,time_start,time_end,split\n" + "".join(
        f"{c},{v},0,2,train\n" for c, v in [("x", "a0"), ("y", "b0"), ("y", "b1"), ("x", "c0"), ("x", "zz"),
                                          ("x", "gone")]))
    listed = load_split(csv_root, "train", layout="csv")
    assert sorted(os.path.basename(p)[:2] for p, _ in listed.videos) == ["a0", "b0", "b1", "c0"]
    assert listed.missing == ["zz_000000_000002.mp4", "gone_000000_000002.mp4"]


def test_list_labels_outside_the_training_classes_are_refused_naming_the_line(tmp_path):
    from video.config import VideoTaskConfig
    from video.task import _load

    for split, labels in (("train", [0, 1, 2]), ("val", [1, 3])):
        lines = []
        for k, label in enumerate(labels):
            write_video(tmp_path / split / f"v{k}.mp4", seconds=0.5)
            lines.append(f"{split}/v{k}.mp4 {label}\n")
        (tmp_path / f"{split}.txt").write_text("".join(lines))
    with pytest.raises(DataError, match=r"val.txt: line 2 \('val/v1.mp4 3'\) has label 3; labels must be 0..2"):
        _load(VideoTaskConfig(name="k", data_dir=str(tmp_path)))
    with pytest.raises(DataError, match=r"line 3 .* has label 2; labels must be 0..1 \(the 2 classes"):
        _load(VideoTaskConfig(name="k", data_dir=str(tmp_path), num_classes=2))


def test_semicolon_separated_csvs_are_read(tmp_path):
    """Spreadsheets in locales with a decimal comma save CSVs with ';'."""
    write_video(tmp_path / "val" / "-abc_000010_000020.mp4", seconds=0.5)
    write_video(tmp_path / "val" / "xyz_000000_000010.mp4", seconds=0.5)
    (tmp_path / "val.csv").write_text('label;youtube_id;time_start;time_end;split\n"air drumming";-abc;10;20;val\n'
                                      "abseiling;xyz;0;10;val\n")
    assert find_split(tmp_path, "val")[0] == "csv"
    listed = load_split(tmp_path, "val")
    assert listed.classes == ["abseiling", "air drumming"] and not listed.missing
    assert sorted((os.path.basename(p), lab) for p, lab in listed.videos) == [("-abc_000010_000020.mp4", 1),
                                                                             ("xyz_000000_000010.mp4", 0)]
    (tmp_path / "train.csv").write_text("val/-abc_000010_000020.mp4;1\nval/xyz_000000_000010.mp4;0\n")  # a list
    listed = load_split(tmp_path, "train")
    assert sorted(lab for _, lab in listed.videos) == [0, 1] and not listed.missing


def test_files_that_are_no_videos_are_ignored_not_counted_bad(tmp_path):
    for name in ("a", "b"):
        write_video(tmp_path / "train" / name / f"{name}.mp4", seconds=0.5)
    for stray in ("a/notes.txt", "a/Thumbs.db", "b/.DS_Store", "README.txt"):
        (tmp_path / "train" / stray).write_text("not a video")
    (tmp_path / "train" / "b" / "c.mp4.part").write_bytes(b"half a download")
    listed = load_split(tmp_path, "train")
    assert sorted(os.path.basename(p) for p in listed.ignored) == ["README.txt", "Thumbs.db", "notes.txt"]
    assert [os.path.basename(p) for p in listed.unsupported] == ["c.mp4.part"]
    assert listed.unusable == 1 and listed.counts("train")["train/ignored"] == 3
    check_bad_fraction("train", listed, 0.34)  # 1 bad of 3 listed: the ignored files are not videos
    assert scan_main([str(tmp_path), "--out", str(tmp_path / "m"), "--split", "train"]) == 0
    report = json.loads((tmp_path / "m" / "train.report.json").read_text())
    assert report["listed"] == 3 and len(report["ignored"]) == 3 and len(report["unsupported"]) == 1
    assert len(read_manifest(tmp_path / "m", "train").ignored) == 3
