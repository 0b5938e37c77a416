"""Segmentation layouts: VOC palette masks with 255 borders, SBD .mat masks, ADE20K's shift, damaged copies."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.segmentation.data import IGNORE, LAYOUTS, check_targets, read_ade20k_label, read_voc_label, scan_split
from transfer.config import compose, validate
from transfer.errors import ConfigError, DataError

VOC, ADE = LAYOUTS.get("voc2012"), LAYOUTS.get("ade20k")


def test_voc_palette_mask_reads_class_indices_and_keeps_255(tmp_path, seg):
    _, label = seg.scene(3, border=True)
    seg.save_palette_png(label, tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").mode == "P"
    out = read_voc_label(str(tmp_path / "m.png"))
    np.testing.assert_array_equal(out, label)
    assert IGNORE in out and set(np.unique(out)) <= {0, 1, 2, 255}


def test_sbd_mat_mask_reads_its_gtcls_segmentation(voc_root):
    mat = next((voc_root / "benchmark_RELEASE" / "dataset" / "cls").glob("2007_*.mat"))
    out = read_voc_label(str(mat))
    assert out.dtype == np.uint8 and out.shape == (56, 72) and set(np.unique(out)) <= {0, 1, 2}


def test_ade20k_labels_shift_by_one_and_other_becomes_ignore(tmp_path):
    label = np.array([[0, 1, 150], [2, 0, 75]], np.uint8)
    Image.fromarray(label, mode="L").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_ade20k_label(str(tmp_path / "a.png")), [[255, 0, 149], [1, 255, 74]])


def test_colour_masks_and_out_of_range_values_are_refused(tmp_path):
    Image.new("RGB", (8, 8), (128, 0, 0)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="RGB image.*index PNGs"):
        read_voc_label(str(tmp_path / "rgb.png"))
    Image.fromarray(np.full((4, 4), 151, np.uint8), mode="L").save(tmp_path / "big.png")
    with pytest.raises(DataError, match=r"values \[151\]"):
        read_ade20k_label(str(tmp_path / "big.png"))


def test_ade20k_value_255_is_refused_naming_the_file(tmp_path, seg):
    # 255 is no ADE20K value (0 = other, 1-150 = classes): shifted by one it became a phantom class 254.
    label = np.array([[0, 1, 150], [255, 0, 75]], np.uint8)
    Image.fromarray(label, mode="L").save(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"a\.png.*values \[255\].*0 \(other\) to 150"):
        read_ade20k_label(str(tmp_path / "a.png"))
    root = seg.write_ade20k(tmp_path / "copy", train=2, val=2)
    bad = root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000002.png"
    scene = np.array(Image.open(bad))
    scene[0, 0] = 255
    Image.fromarray(scene, mode="L").save(bad)
    with pytest.raises(DataError, match=r"(?s)ADE_val_00000002\.png.*\[255\].*Expected layout"):
        scan_split(ADE, root, "validation", decode=True, max_bad_fraction=0.0)


def test_voc_values_are_0_to_20_and_255(tmp_path, seg):
    label = np.array([[0, 20, 255], [21, 1, 0]], np.uint8)
    seg.save_palette_png(label, tmp_path / "m.png")
    with pytest.raises(DataError, match=r"m\.png.*values \[21\].*0-20 and 255"):
        read_voc_label(str(tmp_path / "m.png"))
    label[1, 0] = 0
    seg.save_palette_png(label, tmp_path / "m.png")
    np.testing.assert_array_equal(read_voc_label(str(tmp_path / "m.png")), label)


def test_targets_outside_the_classes_and_255_stop_the_run():
    ok = np.array([[0, 149], [255, 3]], np.uint8)
    assert check_targets(ok, 150, "ok.png") is ok
    for value in (150, 254):
        with pytest.raises(DataError, match=rf"x\.png.*targets \[{value}\].*classes 0-149 and 255"):
            check_targets(np.array([[0, value]], np.uint8), 150, "x.png")
    with pytest.raises(DataError, match=r"targets \[-1\]"):
        check_targets(np.array([[0, -1]], np.int64), 21, "x.png")


def test_train_aug_is_voc_train_plus_sbd_minus_voc_val(voc_root):
    listed = scan_split(VOC, voc_root, "auto", decode=False, max_bad_fraction=0.0)
    ids = {Path(p.image).stem for p in listed.pairs}
    assert listed.note == "train_aug"
    assert ids == {f"2008_{i:06d}" for i in range(4)} | {f"2007_{i:06d}" for i in range(3)}
    assert "2009_000000" not in ids  # SBD lists it, but it is a VOC val image
    sources = {Path(p.label).suffix for p in listed.pairs}
    assert sources == {".png", ".mat"}  # VOC's own masks where they exist, SBD's elsewhere


def test_without_sbd_auto_trains_on_voc_train_and_says_so(tmp_path, seg):
    root = seg.write_voc(tmp_path, sbd=0)
    listed = scan_split(VOC, root, "auto", decode=False, max_bad_fraction=0.0)
    assert len(listed.pairs) == 4 and listed.note.startswith("train (1,464 VOC images")
    with pytest.raises(DataError, match="train_aug needs the SBD masks"):
        scan_split(VOC, root, "train_aug", decode=False, max_bad_fraction=0.0)


def test_damaged_files_are_skipped_and_counted_up_to_the_limit(tmp_path, seg):
    root = seg.write_ade20k(tmp_path, train=6, val=3)
    images = root / "ADEChallengeData2016" / "images" / "training"
    (images / "ADE_train_00000001.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # unreadable
    (root / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000002.png").unlink()  # missing
    Image.new("RGB", (10, 10)).save(images / "ADE_train_00000003.jpg")  # size differs from its label
    listed = scan_split(ADE, root, "training", decode=False, max_bad_fraction=0.5)
    assert listed.skipped == {"missing": 1, "unreadable": 1, "size_mismatch": 1}
    assert len(listed.pairs) == 3 and listed.counts("train")["train/images"] == 3
    with pytest.raises(DataError, match=r"3 of 6 images.*max_bad_fraction=0.2.*ADEChallengeData2016/"):
        scan_split(ADE, root, "training", decode=False, max_bad_fraction=0.2)


def test_evaluation_split_is_decoded_completely(tmp_path, seg):
    root = seg.write_voc(tmp_path, sbd=0)
    mask = root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2009_000001.png"
    mask.write_bytes(mask.read_bytes()[:60])  # header intact, pixel data cut off
    listed = scan_split(VOC, root, "val", decode=True, max_bad_fraction=0.5)
    assert listed.skipped["unreadable"] == 1 and len(listed.pairs) == 2


@pytest.mark.parametrize("task, remove, shown", [
    ("voc_semseg", "VOCdevkit/VOC2012/SegmentationClass", "SegmentationClass/<id>.png"),
    ("ade20k", "ADEChallengeData2016/annotations/validation", "annotations/training/ADE_train_<n>.png"),
])
def test_missing_folders_show_the_expected_layout(task, remove, shown, tmp_path, seg):
    root = seg.write_voc(tmp_path, sbd=0) if task == "voc_semseg" else seg.write_ade20k(tmp_path)
    shutil.rmtree(root / remove)
    layout = VOC if task == "voc_semseg" else ADE
    split = "val" if task == "voc_semseg" else "validation"
    with pytest.raises(DataError, match="Expected layout") as err:
        scan_split(layout, root, split, decode=True, max_bad_fraction=0.0)
    assert remove.split("/")[-1] in str(err.value) and shown in str(err.value)


@pytest.mark.parametrize("task", ["voc_semseg", "ade20k"])
def test_results_record_only_the_protocol_keys_segmentation_uses(task, tmp_path):
    # task.solver holds the training values: the classification fields of protocol=finetune (lr 0.01, steps
    # 20000, batch 256, weight decay 0 beside the recipe's 1e-4, ...) are left out of protocol_config.
    from transfer.results import protocol_config

    base = [f"task={task}", f"task.data_dir={tmp_path}"]
    assert protocol_config(validate(compose(base))) == {"name": "finetune", "freeze_backbone": False}
    assert protocol_config(validate(compose([*base, "protocol=frozen"]))) == {"name": "frozen"}


def test_data_dir_is_required_before_any_run_directory_exists():
    with pytest.raises(ConfigError, match=r"(?s)task.data_dir=PATH.*JPEGImages"):
        validate(compose(["task=voc_semseg"]))


@pytest.mark.parametrize("override, match", [
    ("task.head_norm=LN", "head_norm"), ("task.conv_dims=48", "multiple of 32"),
    ("task.solver.steps=[0.9,0.7]", "increasing fractions"), ("task.solver.lr_scheduler=exp", "lr_scheduler"),
    ("task.input.crop=[0,5]", "crop"), ("task.freeze_at=9", "exceeds"), ("trainer.precision=bf16-mixed", "precision"),
])
def test_bad_values_fail_in_validate(override, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        validate(compose(["task=ade20k", f"task.data_dir={tmp_path}", override]))


def test_protocol_values_that_segmentation_would_ignore_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'protocol.lr'.*name, freeze_backbone.*task recipe's"):
        validate(compose(["task=voc_semseg", f"task.data_dir={tmp_path}", "protocol.lr=0.5"]))
    # frozen transfer is its own protocol: finetune with a frozen backbone is that run (its folder, its rows)
    frozen = validate(compose(["task=voc_semseg", f"task.data_dir={tmp_path}", "protocol.freeze_backbone=true"]))
    assert frozen.protocol.name == "frozen"


@pytest.mark.parametrize("task", ["voc_semseg", "ade20k"])
def test_frozen_protocol_has_its_own_run_folder(task, tmp_path):
    from transfer.rundir import plan_run_dir

    cfg = validate(compose([f"task={task}", f"task.data_dir={tmp_path}", "protocol=frozen", f"run.root={tmp_path}"]))
    assert cfg.protocol.name == "frozen"
    assert plan_run_dir(cfg).path.parent == tmp_path / task / "rs50-frozen"


def test_segmentation_class_aug_folder_with_a_deeplab_style_list(tmp_path, seg):
    root = seg.write_voc(tmp_path, sbd=0)
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "SegmentationClassAug").mkdir()
    lines = []
    for k, name in enumerate(["2011_000001", "2011_000002"]):
        img, label = seg.scene(700 + k, border=False)
        img.save(voc / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(label, mode="L").save(voc / "SegmentationClassAug" / f"{name}.png")  # greyscale, as DeepLab's
        lines.append(f"/JPEGImages/{name}.jpg /SegmentationClassAug/{name}.png")
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(lines) + "\n")
    listed = scan_split(VOC, root, "auto", decode=False, max_bad_fraction=0.0)
    assert listed.note == "train_aug"
    assert [Path(p.label).parent.name for p in listed.pairs] == ["SegmentationClassAug"] * 2


def _items(node):
    """Every test of a collector node, parametrised ones expanded (as pytest's collection yields them)."""
    for child in node.collect():
        yield from [child] if isinstance(child, pytest.Item) else _items(child)


def test_the_detectron2_segmentation_tests_carry_the_marker(request):
    # `pytest -m detectron2` selects them, and TRANSFER_REQUIRE_DETECTRON2=1 (CI) fails a session that skips them.
    # Collected in this process by pytest's own Module collector (no collection hooks, so no report is counted
    # twice), with the markers pytest's `-m` reads.
    from needs_detectron2 import DETECTRON2_PROBLEM

    here = Path(__file__).resolve().parent
    for name in ("test_train.py", "test_bench.py"):
        module = pytest.Module.from_parent(request.session, path=here / name)
        if DETECTRON2_PROBLEM:  # skipped at import, with the reason the session counts as a want of detectron2
            try:
                list(_items(module))
            except pytest.skip.Exception as skip:
                assert "detectron2 is not installed" in str(skip), str(skip)
                continue
            # This session collected (and skipped) the file already: pytest hands back the module as far as its
            # import ran, up to the skip. Its module-level mark is what -m reads for every test in the file.
            marks = getattr(module.obj, "pytestmark", [])
            assert any(m.name == "detectron2" for m in (marks if isinstance(marks, list) else [marks])), name
            continue
        items = list(_items(module))
        assert items, name
        unmarked = [item.nodeid for item in items if item.get_closest_marker("detectron2") is None]
        assert not unmarked, f"tests without the detectron2 marker: {unmarked}"
