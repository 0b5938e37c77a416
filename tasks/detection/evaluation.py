"""detectron2's VOC and COCO evaluators, scoring exactly the test images that were read, plus a detection count.

- Images left out of the test split (undecodable, counted in results.json) are left out of the ground
  truth too, so they do not score as missed objects.
- The VOC evaluator also reports per-class AP50 (``AP50-<class>``), computed with detectron2's own
  ``voc_eval`` (the VOC devkit's AP: 11-point on VOC2007, area under the curve on VOC2012). A class without
  ground truth in the evaluated images is left out of the means and reported as undefined (NaN).
- :class:`DetectionCounter` counts the detections the model made, so a detector that made none is
  reported as such instead of scoring zeros.
"""
from __future__ import annotations

import math
import os
import tempfile
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, DatasetEvaluators, PascalVOCDetectionEvaluator
from detectron2.evaluation.pascal_voc_evaluation import parse_rec, voc_eval
from detectron2.utils import comm

COUNT_TASK = "detections"  # results key of DetectionCounter: detections/count, detections/images


class VOCEvaluator(PascalVOCDetectionEvaluator):
    """PascalVOCDetectionEvaluator on the images of the registered split, with per-class AP50.

    A class with no (non-difficult) object in the evaluated images has no defined AP: the devkit's code would
    score it 0 and pull the mean down. Such a class is left out of AP, AP50 and AP75 and reported as NaN in
    ``AP50-<class>``, which the run lists under ``undefined_metrics`` (COCO's evaluator does the same).
    """

    def __init__(self, dataset_name: str, output_dir: Path):
        super().__init__(dataset_name)
        kept = [d["image_id"] for d in DatasetCatalog.get(dataset_name)]
        listed = Path(self._image_set_path).read_text().split()
        if len(kept) != len(listed):
            # The devkit's AP reads its image list from this file: the left-out images must leave it too.
            output_dir.mkdir(parents=True, exist_ok=True)
            path = output_dir / f"{MetadataCatalog.get(dataset_name).split}_evaluated.txt"
            path.write_text("\n".join(kept) + "\n")
            self._image_set_path = str(path)

    def _objects_per_class(self) -> dict[str, int]:
        """Non-difficult ground-truth objects of each class in the evaluated images (the devkit's ``npos``)."""
        counts = dict.fromkeys(self._class_names, 0)
        for image_id in Path(self._image_set_path).read_text().split():
            for obj in parse_rec(self._anno_file_template.format(image_id)):
                if obj["name"] in counts and not obj["difficult"]:
                    counts[obj["name"]] += 1
        return counts

    def evaluate(self):
        gathered = comm.gather(self._predictions, dst=0)  # every rank takes part in the gather
        if not comm.is_main_process():
            return {}
        lines = defaultdict(list)
        for per_rank in gathered:
            for cls_id, found in per_rank.items():
                lines[cls_id].extend(found)
        objects = self._objects_per_class()
        aps: dict[int, list[float]] = defaultdict(list)  # IoU threshold (percent) -> AP of each defined class
        per_class = {}
        with tempfile.TemporaryDirectory(prefix="voc_eval_") as folder:
            template = os.path.join(folder, "{}.txt")
            for cls_id, cls_name in enumerate(self._class_names):
                if not objects[cls_name]:
                    per_class[f"AP50-{cls_name}"] = math.nan  # undefined: no object to find
                    continue
                Path(template.format(cls_name)).write_text("\n".join(lines.get(cls_id, [""])))
                for thresh in range(50, 100, 5):
                    _, _, ap = voc_eval(template, self._anno_file_template, self._image_set_path, cls_name,
                                        ovthresh=thresh / 100.0, use_07_metric=self._is_2007)
                    aps[thresh].append(float(ap) * 100)
                per_class[f"AP50-{cls_name}"] = aps[50][-1]
        if aps:
            mean = {t: float(np.mean(v)) for t, v in aps.items()}
            headline = {"AP": float(np.mean(list(mean.values()))), "AP50": mean[50], "AP75": mean[75]}
        else:  # no class has an object in the test images: nothing to measure
            headline = {"AP": math.nan, "AP50": math.nan, "AP75": math.nan}
        return OrderedDict(bbox={**headline, **per_class})


class COCOSubsetEvaluator(COCOEvaluator):
    """COCOEvaluator on the images of the registered split (COCOeval's ``imgIds``)."""

    def __init__(self, dataset_name: str, output_dir: Path):
        super().__init__(dataset_name, output_dir=str(output_dir))
        self._kept_ids = [d["image_id"] for d in DatasetCatalog.get(dataset_name)]

    def evaluate(self, img_ids=None):
        return super().evaluate(img_ids=self._kept_ids if img_ids is None else img_ids)


class DetectionCounter(DatasetEvaluator):
    """Counts test images and the instances the model predicted on them, over all processes."""

    def reset(self) -> None:
        self._images = self._detections = 0

    def process(self, inputs, outputs) -> None:
        self._images += len(inputs)
        self._detections += sum(len(o["instances"]) for o in outputs if "instances" in o)

    def evaluate(self):
        counts = comm.gather((self._images, self._detections), dst=0)
        if not comm.is_main_process():
            return {}
        return {COUNT_TASK: {"images": sum(c[0] for c in counts), "count": sum(c[1] for c in counts)}}


EVALUATORS = {"voc": VOCEvaluator, "coco": COCOSubsetEvaluator}


def build_evaluator(dataset_name: str, output_dir: Path) -> DatasetEvaluators:
    """The evaluator of ``dataset_name``'s layout (VOC or COCO), with a detection count beside it."""
    layout = MetadataCatalog.get(dataset_name).transfer_layout
    return DatasetEvaluators([EVALUATORS[layout](dataset_name, output_dir), DetectionCounter()])
