"""Fine-tuning under DDP (two CPU processes over gloo) scores every test image exactly once: its metrics
equal a single-process evaluation of the same checkpoint on the same 9 images. DistributedSampler used to pad
9 images to 10 by repeating one, and that repeat was scored (top-1 10.00 = 1/10)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.classification.config import ClassificationTaskConfig
from tasks.classification.datasets import DATASETS, Transformed
from tasks.classification.finetune import FinetuneModule
from tasks.classification.metrics import classification_metrics
from tasks.classification.protocols import FinetuneProtocolConfig
from tasks.classification.task import eval_transform
from transfer.backbones import build_backbone

REPO = Path(__file__).resolve().parents[3]


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3)).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.e2e
def test_ddp_finetune_metrics_equal_single_process_metrics(tmp_path, image_folder, facts):
    classes, per_class = facts
    assert per_class["test"] * len(classes) == 9  # an odd test split: 2 processes need one padding item
    (image_folder / "train" / classes[0] / "cut.jpg").write_bytes(truncated_jpeg())  # decoded in 2 epochs x 2 ranks
    run_dir = tmp_path / "run"
    args = ["task=cifar100", f"task.data_dir={image_folder}", "task.max_bad_fraction=0.2", "task.resolution=32",
            "task.check_split_sizes=false",
            "backbone=rs50", "backbone.weights=random", "protocol=finetune_strong", "protocol.randaugment=null",
            "trainer.precision=32-true", "trainer.num_workers=0", "trainer.batch_size=4", "trainer.eval_batch_size=4",
            "trainer.max_epochs=2", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.progress_bar=false",
            "logger.wandb.mode=disabled", f"run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "transfer.run", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The eval loaders carry their own sampler over the padded set, so Lightning does not warn that it
    # "replicates some samples", which it does not.
    assert "replicates some samples" not in proc.stderr + proc.stdout
    results = json.loads((run_dir / "results.json").read_text())
    counts = results["counts"]
    assert counts["images_test"] == 9 and counts["images_test_scored"] == 9
    assert counts["undecodable_images"] == 1  # once, though both processes met it in both epochs

    # The same checkpoint, evaluated in this single process on the same 9 test images.
    (best,) = [p for p in (run_dir / "checkpoints").glob("epoch*.ckpt")]
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    backbone = build_backbone("rs50", weights="random")
    module = FinetuneModule(backbone, len(classes), FinetuneProtocolConfig())
    module.load_state_dict(state)
    module.eval()
    task = ClassificationTaskConfig(name="cifar100", dataset="cifar100", data_dir=str(image_folder),
                                    max_bad_fraction=0.2, check_split_sizes=False)
    test = Transformed(DATASETS.get("cifar100")(task).test, eval_transform(backbone, 32))
    images, labels = zip(*(test[i] for i in range(len(test))))
    with torch.no_grad():
        logits = module(torch.stack(images))
    single = classification_metrics(logits, torch.tensor(labels), len(classes), "test")
    for key, value in single.items():
        assert results["metrics"][key] == pytest.approx(value, abs=1e-4), key
