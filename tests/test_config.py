"""Every recipe composes into a valid typed config; bad input fails before any data or model work."""
from pathlib import Path

import pytest
from detection_copies import detection_data_overrides
from omegaconf import OmegaConf

from transfer.backbones import BACKBONES
from transfer.config import RunConfig, adapter_protocols, compose, recipe_names, task_adapter, validate
from transfer.errors import ConfigError
from transfer.registry import UnknownNameError
from transfer.run import main


def _protocols(task: str) -> dict[str, type]:
    """The protocols of the adapter task recipe ``task`` names (read from the recipe, no compose; that a composed
    recipe names that adapter is checked by test_every_task_recipe_composes)."""
    return adapter_protocols(task)


def _first_protocol(task: str) -> str:
    return next(iter(_protocols(task)))


@pytest.mark.parametrize("task", recipe_names("task"))
def test_every_task_recipe_composes(task, tmp_path):
    adapter = task_adapter(task)
    overrides = [f"task={task}", f"protocol={_first_protocol(task)}"]
    if task != "digits":  # every other task reads a local copy; config checks only that one is named
        # detection checks its copy's layout and classes before a run starts: give it a tiny real one
        overrides += (detection_data_overrides(task, tmp_path) if adapter == "detection"
                      else [f"task.data_dir={tmp_path}"])
    raw = compose(overrides)
    assert raw.task.adapter == adapter and raw.protocol.name == _first_protocol(task)
    cfg = validate(raw)
    assert isinstance(cfg, RunConfig) and cfg.task.name == task
    assert isinstance(cfg.protocol, _protocols(task)[_first_protocol(task)])


@pytest.mark.parametrize("backbone", recipe_names("backbone"))
def test_every_backbone_recipe_composes(backbone):
    cfg = validate(compose([f"backbone={backbone}", "backbone.weights=random"]))
    assert cfg.backbone.name == backbone and backbone in BACKBONES


@pytest.mark.parametrize("protocol", recipe_names("protocol"))
def test_every_protocol_recipe_composes_with_a_task_that_takes_it(protocol, tmp_path):
    tasks = [t for t in recipe_names("task") if protocol in _protocols(t)]
    assert tasks, f"no task recipe takes protocol {protocol!r}"
    cfg = validate(compose([f"protocol={protocol}", f"task={tasks[0]}", f"task.data_dir={tmp_path}"]))
    assert cfg.protocol.name == protocol and isinstance(cfg.protocol, _protocols(tasks[0])[protocol])


def test_a_protocol_name_composes_the_schema_of_the_tasks_own_adapter(tmp_path):
    """protocol=finetune is classification's recipe for an image task and the 3D recipe for a video task; a key of
    the other adapter's schema is refused naming the valid ones."""
    from dataclasses import asdict

    from tasks.classification.protocols import FinetuneProtocolConfig
    from video.config import VideoFinetuneProtocolConfig

    image = validate(compose(["task=cifar100", "protocol=finetune", f"task.data_dir={tmp_path}"]))
    video = validate(compose(["task=kinetics400", "protocol=finetune", f"task.data_dir={tmp_path}"]))
    assert type(image.protocol) is FinetuneProtocolConfig and type(video.protocol) is VideoFinetuneProtocolConfig
    # one source of truth: the composed sections are the schemas' defaults, the published recipes
    assert asdict(image.protocol) == asdict(FinetuneProtocolConfig())
    assert asdict(video.protocol) == asdict(VideoFinetuneProtocolConfig())
    assert (video.protocol.lr, video.protocol.ema_decay, video.protocol.bn_momentum) == (0.8, 0.9999, 1.0)
    with pytest.raises(ConfigError, match="unknown key 'protocol.randaugment'.*Valid keys of protocol: name, lr,"):
        validate(compose(["task=kinetics400", "protocol.randaugment=rand-m9-n2", f"task.data_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="unknown key 'protocol.lr_reference_batch'"):
        validate(compose(["task=cifar100", "protocol=finetune", "protocol.lr_reference_batch=256"]))


def test_backbone_recipes_come_from_the_registry_and_an_unknown_name_lists_them(tmp_path):
    assert recipe_names("backbone") == BACKBONES.names()
    assert not (Path(__file__).parent.parent / "recipes" / "backbone").exists()
    with pytest.raises(UnknownNameError) as err:
        compose(["backbone=rs15"])
    assert "Did you mean 'rs152'?" in str(err.value) and "rs420_i320" in str(err.value)
    cfg = validate(compose(["backbone=rs152", "backbone.weights=random", "backbone.drop_path_rate=0.2"]))
    assert (cfg.backbone.name, cfg.backbone.drop_path_rate) == ("rs152", 0.2)


def test_a_schema_key_the_recipe_does_not_spell_out_is_set_with_one_compose(tmp_path):
    """Recipes extend the registered schemas, so every schema key is in the composed section (no second compose)."""
    raw = compose(["task=cifar100"])
    assert "limit_per_split" in raw.task and raw.task.limit_per_split is None
    assert validate(compose(["task=cifar100", "task.limit_per_split=5"])).task.limit_per_split == 5

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


def test_a_rewritten_task_recipe_names_its_new_adapter(tmp_path, monkeypatch):
    """task_adapter and default_choice parse a recipe once per version of the file: a rewrite is read again."""
    import transfer.config as config

    (tmp_path / "task").mkdir()
    recipe = tmp_path / "task" / "mine.yaml"
    recipe.write_text("name: mine\nadapter: classification\n")
    (tmp_path / "config.yaml").write_text("defaults:\n  - task: mine\n  - _self_\n")
    monkeypatch.setattr(config, "RECIPES_DIR", tmp_path)
    assert (config.task_adapter("mine"), config.default_choice("task")) == ("classification", "mine")
    recipe.write_text("name: mine\nadapter: video\n")
    (tmp_path / "config.yaml").write_text("defaults:\n  - task: yours\n  - _self_\n")
    assert (config.task_adapter("mine"), config.default_choice("task")) == ("video", "yours")
    recipe.write_text("name: mine\n")
    with pytest.raises(ConfigError, match="has no 'adapter' key"):
        config.task_adapter("mine")


def test_the_compose_savings_leave_the_config_unchanged(monkeypatch):
    """compose reads Hydra's ConfigStore itself instead of a deep copy per compose (_share_config_store) and
    composes Hydra's unused logging setups from their empty recipes (HYDRA_OVERRIDES): the config is the one
    Hydra's defaults give, and a node stored after the first compose is seen by the next."""
    import copy

    from hydra.core.config_store import ConfigStore

    import transfer.config as config

    overrides = ["task=cifar100", "protocol=knn", "backbone=rs101", "trainer.max_epochs=3"]
    shared = compose(overrides)
    store = ConfigStore.instance()
    assert copy.deepcopy(store) is store and config.HYDRA_OVERRIDES
    monkeypatch.delattr(ConfigStore, "__deepcopy__")
    monkeypatch.setattr(config, "_share_config_store", lambda store_class: None)
    monkeypatch.setattr(config, "HYDRA_OVERRIDES", ())
    assert copy.deepcopy(store) is not store
    assert OmegaConf.to_container(compose(overrides)) == OmegaConf.to_container(shared)
    monkeypatch.undo()
    assert copy.deepcopy(store) is store
    trainer = {**OmegaConf.to_container(shared.trainer), "max_epochs": 7}
    store.store(group="trainer", name="live_store_test", node=trainer)
    try:
        assert compose(["trainer=live_store_test"]).trainer.max_epochs == 7
    finally:
        del store.repo["trainer"]["live_store_test.yaml"]
