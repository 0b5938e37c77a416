"""Every bad value is refused once, completely, before anything is created.

``python -m transfer.run`` (its ``main``, which returns the exit code) with each value below exits 2 with one line
naming the key and its valid choices or range, and leaves no run directory and no W&B run behind: each of these
once passed validation and failed only after a run directory and a W&B run existed (some as library tracebacks).
The config checks come before any data access (``task.data_dir`` is given where a task needs one, so the bad
value, not the missing data, is what fails), and detection's need no detectron2 (``tasks/detection/schema.py``).
"""
import sys

import pytest

from transfer.run import main

BAD_VALUES = [
    # issue 16's list
    (["task=voc_detection", "task.backbone_norm=GN"], "task.backbone_norm='GN'; valid: FrozenBN, BN, SyncBN"),
    (["task=voc_detection", "task.base_config=NoSuch/config.yaml"],
     "task.base_config='NoSuch/config.yaml' is not a detectron2 model-zoo config (folders: COCO-Detection"),
    (["task=voc_detection", "task.freeze_at=9"], "task.freeze_at=9 exceeds the 5 levels of backbone 'rs50' (0 trains"),
    (["task=kinetics400", "task.data_dir={tmp}", "task.train_crop=jitter", "task.scale_jitter=[100,120]"],
     "task.scale_jitter=[100, 120] resizes the short side below the 224 px crop"),
    (["trainer.accelerator=tpu"], "trainer.accelerator='tpu'; valid: auto, cpu, gpu, cuda"),
    (["trainer.strategy=nonsense"], "trainer.strategy='nonsense'; valid: auto, ddp,"),
    # found by trying odd values of each key of a few recipes: each failed after the run directory existed
    (["task=kinetics400", "task.data_dir={tmp}", "task.layout=nonsense"],
     "task.layout='nonsense'; valid: auto, csv, list, folders"),
    (["task=kinetics400", "task.data_dir={tmp}", "task.inflation.stage_temporal_kernels=[1,1,3]"],
     "task.inflation.stage_temporal_kernels=[1, 1, 3] has 3 entries; backbone 'rs50' has 4 stages"),
    (["task=kinetics400", "task.data_dir={tmp}/missing"], "task.data_dir='{tmp}/missing' is not a directory"),
    (["task=kinetics400", "task.data_dir={tmp}", "task.manifest={tmp}/missing"],
     "task.manifest='{tmp}/missing' is not a directory"),
    (["task=kinetics400", "task.data_dir={tmp}", "task.num_classes=0"], "task.num_classes=0 must be at least 1"),
    (["task=kinetics400", "task.data_dir={tmp}", "protocol.label_smoothing=1.5"],
     "protocol.label_smoothing=1.5 must each be in [0, 1)"),
    (["task=kinetics400", "task.data_dir={tmp}", "protocol.randaugment=rand-m9-n2"],  # the image recipe's key
     "unknown key 'protocol.randaugment'"),
    (["task=voc_detection", "protocol.lr=0.1"], "Valid keys of protocol: name, freeze_backbone"),
    (["task=ade20k", "task.data_dir={tmp}/missing", "backbone.weights=random"],
     "task.data_dir='{tmp}/missing' is not a directory"),
    (["task=voc_semseg", "task.data_dir={tmp}/missing", "backbone.weights=random"],
     "task.data_dir='{tmp}/missing' is not a directory"),
    (["task=nyu_depth", "task.data_dir={tmp}/missing"], "task.data_dir='{tmp}/missing' is not a directory"),
    (["task=voc_detection", "task.data_dir={tmp}/missing"], "task.data_dir='{tmp}/missing' is not a directory"),
    (["task=nyu_depth", "task.data_dir={tmp}", "protocol.momentum=-1"], "protocol.momentum=-1.0 must be in [0, 1)"),
    (["task=imagenet", "task.data_dir={tmp}/missing"], "task.data_dir='{tmp}/missing' is not a directory"),
    (["task=cifar100", "task.data_dir={tmp}", "task.split_seed=-1"], "task.split_seed=-1 must be in [0, 2**32)"),
    (["protocol=finetune", "protocol.randaugment=nonsense"],
     "protocol.randaugment='nonsense' is no timm augmentation policy"),
    (["protocol=finetune", "protocol.dropout=1.5"], "protocol.dropout=1.5 must be in [0, 1)"),
    (["protocol=linear", "protocol.max_iter=0"], "protocol.max_iter=0 must be at least 1"),
    # trainer, logger and run keys
    (["trainer.accelerator=gpu"], "no CUDA device is visible"),
    (["trainer.accelerator=cuda", "trainer.devices=2"], "no CUDA device is visible"),
    (["trainer.accelerator=cpu", "trainer.precision=16-mixed"], "trainer.precision='16-mixed' needs a CUDA device"),
    (["trainer.accelerator=cpu", "trainer.strategy=fsdp"], "trainer.strategy='fsdp' needs CUDA"),
    (["trainer.num_nodes=2"], "trainer.num_nodes=2 needs a launcher"),
    (["trainer.max_steps=0"], "trainer.max_steps=0"),
    (["trainer.max_steps=-5"], "trainer.max_steps=-5"),
    (["trainer.limit_train_batches=1.5"], "trainer.limit_train_batches=1.5"),
    (["trainer.limit_eval_batches=0"], "trainer.limit_eval_batches=0"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0"),
    (["trainer.seed=-1"], "trainer.seed=-1"),
    (["logger.wandb.init_timeout=0"], "logger.wandb.init_timeout=0"),
    (["resume=maybe"], "resume='maybe' must be true or false"),
    (["resume_allow_changes=perhaps"], "resume_allow_changes='perhaps'"),
    (["resume=true"], "resume=true but no interrupted run"),
    (["run.dir={tmp}/a-file"], "is not a folder"),
    # depth's SGD recipe is its own protocol's (tasks/depth/config.py)
    (["task=nyu_depth", "task.data_dir={tmp}", "protocol.warmup_fraction=1"],
     "protocol.warmup_fraction=1.0 must be in [0, 1)"),
    (["task=nyu_depth", "task.data_dir={tmp}", "protocol=frozen", "protocol.lr_reference_batch=0"],
     "protocol.lr_reference_batch=0 must be at least 1"),
    (["task=nyu_depth", "task.data_dir={tmp}", "task.optim.lr=0.1"],
     "The training values (lr, lr_reference_batch, weight_decay, momentum, nesterov, steps, warmup_fraction) are the "
     "protocol's: set protocol.<key>"),
    (["task=nyu_depth", "task.data_dir={tmp}", "protocol=frozen", "protocol.freeze_backbone=true"],
     "Valid keys of protocol: name, lr, lr_reference_batch, weight_decay, momentum, nesterov, steps, warmup_fraction."),
    # Nesterov without momentum: the optimiser turned Nesterov off quietly and results.json's recipe said it ran
    (["task=nyu_depth", "task.data_dir={tmp}", "protocol=frozen", "protocol.nesterov=true", "protocol.momentum=0"],
     "protocol.nesterov=true needs protocol.momentum > 0 (got protocol.momentum=0.0); set protocol.momentum"),
    (["task=nyu_depth", "task.data_dir={tmp}", "protocol.nesterov=true", "protocol.momentum=0"],
     "protocol.nesterov=true needs protocol.momentum > 0"),
    (["task=kinetics400", "task.data_dir={tmp}", "protocol.momentum=0"],  # the recipe's nesterov=true
     "protocol.nesterov=true needs protocol.momentum > 0"),
    (["protocol=finetune", "protocol.momentum=0"], "protocol.nesterov=true needs protocol.momentum > 0"),
    (["protocol=finetune_strong", "protocol.momentum=0"], "protocol.nesterov=true needs protocol.momentum > 0"),
]


@pytest.mark.parametrize("overrides, fragment", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_exits_2_with_one_line_and_nothing_created(overrides, fragment, tmp_path, capsys, monkeypatch):
    import torch
    import wandb

    from transfer.config import LAUNCHER_VARIABLES

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    for var in LAUNCHER_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("a W&B run was started"))
    monkeypatch.chdir(tmp_path)  # a wandb/ folder would land here or under the run root
    data = tmp_path / "data"
    data.mkdir()
    (data / "a-file").write_text("not a folder")
    root = tmp_path / "runs"
    args = [o.format(tmp=data) for o in overrides]
    code = main([*args, f"run.root={root}", "logger.wandb.mode=offline"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert fragment.format(tmp=data) in err, err
    assert not root.exists(), "nothing may be written before the whole configuration is checked"
    assert not list(tmp_path.rglob("wandb")), "no W&B run may exist"


def test_detection_values_are_checked_without_detectron2(tmp_path, capsys, monkeypatch):
    """The detection checks live in tasks/detection/schema.py, which needs no detectron2: with the package hidden
    (``sys.modules[name] = None`` reports it absent, and makes any import of it fail) the same three values exit 2
    naming the key. Every detectron2 module is hidden, not only the package: one already imported by an earlier
    test would otherwise still import. (A fresh interpreter without detectron2 running a detection task:
    tests/tasks/detection/test_config.py, e2e.)"""
    from tasks.detection.requirement import detectron2_available

    for name in [m for m in sys.modules if m == "detectron2" or m.startswith("detectron2.")] or ["detectron2"]:
        monkeypatch.setitem(sys.modules, name, None)
    assert not detectron2_available()
    root = tmp_path / "runs"
    for overrides, fragment in BAD_VALUES[:3]:
        assert main([*overrides, f"run.root={root}", "logger.wandb.mode=disabled"]) == 2, overrides
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("error:") and fragment in err, err
    assert not root.exists()
