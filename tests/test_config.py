"""Every recipe composes into a valid typed config; bad input fails before any data or model work."""
import functools

import pytest
from detection_copies import detection_data_overrides

from transfer.backbones import BACKBONES
from transfer.config import RECIPES_DIR, RunConfig, compose, recipe_names, validate
from transfer.errors import ConfigError
from transfer.protocols import PROTOCOLS
from transfer.registry import UnknownNameError
from transfer.run import main
from transfer.tasks import TASKS, load_adapters


@functools.cache  # each call composes the task's recipe; the tests below ask for every task's list many times
def _protocols(task: str) -> tuple[str, ...]:
    load_adapters()
    return TASKS.get(str(compose([f"task={task}"]).task.adapter)).protocols


def _first_protocol(task: str) -> str:
    return _protocols(task)[0]


@pytest.mark.parametrize("task", recipe_names("task"))
def test_every_task_recipe_composes(task, tmp_path):
    overrides = [f"task={task}", f"protocol={_first_protocol(task)}"]
    if task != "digits":  # every other task reads a local copy; config checks only that one is named
        adapter = str(compose([f"task={task}"]).task.adapter)
        # detection checks its copy's layout and classes before a run starts: give it a tiny real one
        overrides += (detection_data_overrides(task, tmp_path) if adapter == "detection"
                      else [f"task.data_dir={tmp_path}"])
    cfg = validate(compose(overrides))
    assert isinstance(cfg, RunConfig) and cfg.task.name == task


@pytest.mark.parametrize("backbone", recipe_names("backbone"))
def test_every_backbone_recipe_composes(backbone):
    cfg = validate(compose([f"backbone={backbone}", "backbone.weights=random"]))
    assert cfg.backbone.name == backbone and backbone in BACKBONES


@pytest.mark.parametrize("protocol", recipe_names("protocol"))
def test_every_protocol_recipe_composes_with_a_task_that_takes_it(protocol, tmp_path):
    tasks = [t for t in recipe_names("task") if protocol in _protocols(t)]
    assert tasks, f"no task recipe takes protocol {protocol!r}"
    cfg = validate(compose([f"protocol={protocol}", f"task={tasks[0]}", f"task.data_dir={tmp_path}"]))
    assert cfg.protocol.name == protocol and protocol in PROTOCOLS


def test_overrides_reach_the_typed_config(tmp_path):
    cfg = validate(compose(["trainer.max_epochs=3", "trainer.devices=2", "trainer.accelerator=cpu",
                            "logger.wandb.mode=disabled",
                            f"run.dir={tmp_path}", "backbone.weights=random", "task.resolution=48"]))
    assert (cfg.trainer.max_epochs, cfg.trainer.devices, cfg.logger.wandb.mode) == (3, 2, "disabled")
    assert cfg.run.dir == str(tmp_path) and cfg.task.resolution == 48
    assert "max_epochs: 3" in cfg.to_yaml()


def test_unknown_task_lists_valid_names_and_closest_match():
    with pytest.raises(UnknownNameError) as err:
        compose(["task=digts"])
    assert "Did you mean 'digits'" in str(err.value) and "digits" in err.value.choices


@pytest.mark.parametrize("override, fragment", [
    ("trainer.precision=fp8", "trainer.precision='fp8'"),
    ("trainer.devices=0", "trainer.devices=0"),
    ("logger.wandb.mode=sometimes", "logger.wandb.mode='sometimes'"),
    ("backbone.weights=/no/such/file.safetensors", "/no/such/file.safetensors"),
    ("task.metric=f1", "task.metric='f1'"),
    ("+trainer.learning_rate=0.1", "learning_rate"),
    ("protocol.k=0", "protocol.k=0"),
])
def test_bad_values_are_config_errors_naming_the_value(override, fragment):
    overrides = [override] + (["protocol=knn"] if override.startswith("protocol.k") else [])
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    assert fragment in str(err.value)


def test_protocol_that_does_not_apply_to_the_task_is_refused():
    only = [t for t in recipe_names("task") if "linear" not in _protocols(t)]
    assert only, "expected at least one task (video, detection) without the linear protocol"
    with pytest.raises(ConfigError, match="does not apply"):
        validate(compose([f"task={only[0]}", "protocol=linear", "task.data_dir=/tmp"]))


def test_bad_value_fails_before_any_run_directory_exists(tmp_path, capsys):
    code = main(["trainer.precision=fp8", f"run.root={tmp_path}"])
    assert code == 2
    assert "trainer.precision='fp8'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("protocol", recipe_names("protocol"))
def test_protocol_recipe_values_equal_the_schema_defaults(protocol):
    """One source of truth: a recipe spells out its schema's defaults (video checks edits against them)."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    load_adapters()
    schema = PROTOCOLS.get(protocol)
    recipe = OmegaConf.to_container(OmegaConf.load(RECIPES_DIR / "protocol" / f"{protocol}.yaml"))
    assert recipe == {k: v for k, v in asdict(schema()).items() if k in recipe}


# Each of these passed validation once and failed only after a run directory and a W&B run existed.
BAD_VALUES = [
    (["trainer.accelerator=tpu"], "trainer.accelerator='tpu'"),
    (["trainer.strategy=nonsense"], "trainer.strategy='nonsense'"),
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
]


@pytest.mark.parametrize("overrides, fragment", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_exits_2_with_one_line_and_no_run_directory(overrides, fragment, tmp_path, capsys, monkeypatch):
    import torch

    from transfer.config import LAUNCHER_VARIABLES

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    for var in LAUNCHER_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "a-file").write_text("not a folder")
    root = tmp_path / "runs"
    code = main(["protocol=finetune", *[o.format(tmp=tmp_path) for o in overrides], f"run.root={root}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert fragment in err
    assert not root.exists(), "nothing may be written before the whole configuration is checked"


@pytest.mark.e2e  # a fresh python -m transfer.run process: seconds of imports for one line
def test_bad_value_through_the_command_line_is_one_line(tmp_path):
    from suite_helpers import run_cli

    proc = run_cli("trainer.strategy=nonsense", "protocol=finetune", f"run.root={tmp_path / 'runs'}", cwd=tmp_path,
                   timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "trainer.strategy='nonsense'" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("protocol", ["linear", "knn"])
@pytest.mark.parametrize("override, named, fine", [
    ("protocol.resident_mb=nan", "protocol.resident_mb=nan (a finite number of MiB, 0 or more)", "shard_images"),
    ("protocol.resident_mb=inf", "protocol.resident_mb=inf (a finite number of MiB, 0 or more)", "chunk_rows"),
    ("protocol.resident_mb=-1", "protocol.resident_mb=-1.0 (a finite number of MiB, 0 or more)", "shard_images"),
    ("protocol.shard_images=0", "protocol.shard_images=0 (an integer of at least 1)", "resident_mb"),
    ("protocol.chunk_rows=-3", "protocol.chunk_rows=-3 (an integer of at least 1)", "shard_images"),
])
def test_memory_keys_refuse_bad_values_naming_only_the_bad_key(protocol, override, named, fine):
    with pytest.raises(ConfigError) as err:
        validate(compose([f"protocol={protocol}", override]))
    assert named in str(err.value) and fine not in str(err.value), str(err.value)


def test_valid_keys_of_a_type_error_are_the_schema_fields_only():
    with pytest.raises(ConfigError) as err:
        validate(compose(["protocol=linear", "protocol.l2_min=abc"]))
    listed = str(err.value).split("valid keys: ")[1]
    assert listed.startswith("name, l2_min,") and "PUBLISHED_KEYS" not in listed and "shard_images" in listed, listed
