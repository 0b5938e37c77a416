"""SSL converters: small checkpoints in each official layout (random values, real names and shapes) must
convert to timm models whose outputs equal the source layout's own computation.

SimCLR and BYOL have no PyTorch source model, so the tests replay their TF/Haiku graphs directly on
the official variable names. The input is 33 px so every stride-2 layer sees an odd size (33, 17, 9, 5, 3),
where TF's 'SAME' padding is symmetric like PyTorch's (at even sizes TF pads one extra pixel at the end only).
"""
from __future__ import annotations

import collections
import functools
import os
import pickle
import sys
import types

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

from transfer.backbones import BACKBONES, build_backbone
from transfer.convert.__main__ import main as convert_main
from transfer.convert.byol import ArrayUnpickler, convert_byol
from transfer.convert.dino import convert_dino
from transfer.convert.moco import MOCO_V2_PREFIX, MOCO_V3_PREFIX, convert_moco_v3, encoder_state_dict
from transfer.convert.simclr import simclr_to_timm
from transfer.errors import WeightsError

SIZE = 33
EPS = 1e-5
SSL_ENTRIES = ("simclr_r50", "simclrv2_r50_1x_sk0", "byol_r50", "moco_v2_r50", "moco_v3_r50", "dino_r50")


def _image(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _bn_arrays(rng: np.random.Generator, c: int) -> tuple[np.ndarray, ...]:
    """gamma, beta, mean, var of one BN with non-trivial statistics."""
    return (rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c), rng.uniform(0.5, 2.0, c))


def _kernel(rng: np.random.Generator, k: int, cin: int, cout: int) -> np.ndarray:
    return (rng.normal(size=(k, k, cin, cout)) * np.sqrt(2.0 / (k * k * cin))).astype(np.float32)  # HWIO


def _bn(x: torch.Tensor, gamma, beta, mean, var) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    t = [torch.as_tensor(np.asarray(a), dtype=torch.float32).reshape(shape) for a in (gamma, beta, mean, var)]
    return (x - t[2]) / torch.sqrt(t[3] + EPS) * t[0] + t[1]


def _same_pad(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    """TF 'SAME' padding: total padding split with the extra pixel at the end."""
    pads = []
    for n in (x.shape[3], x.shape[2]):
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def _conv_hwio(x: torch.Tensor, kernel, stride: int, *, fixed: bool) -> torch.Tensor:
    """Conv with an HWIO kernel: SimCLR's fixed padding (fixed=True) or Haiku's 'SAME'."""
    w = torch.as_tensor(np.asarray(kernel), dtype=torch.float32).permute(3, 2, 0, 1)
    k = w.shape[-1]
    if fixed and stride > 1:
        x = F.pad(x, [(k - 1) // 2, k - 1 - (k - 1) // 2] * 2)
    elif stride > 1 or k > 1:
        x = _same_pad(x, k, stride)
    return F.conv2d(x, w, stride=stride)


def _timm_logits(arch: str, sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model = timm.create_model(arch, pretrained=False).eval()
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------- SimCLR (TF1 variable names)

def _tf(base: str, i: int) -> str:
    return base if i == 0 else f"{base}_{i}"


def simclr_variables(depths: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """Variables of SimCLR's resnet_v1 (sk_ratio 0) in creation order, plus the extras a release holds: drawn
    once per session for each (depths, seed); each call gets its own dict (the arrays are never written)."""
    return dict(_simclr_variables(depths, seed))


@functools.cache
def _simclr_variables(depths: tuple[int, ...], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    v: dict[str, np.ndarray] = {}
    counts = {"conv2d": 0, "batch_normalization": 0}

    def conv(k, cin, cout):
        v[f"base_model/{_tf('conv2d', counts['conv2d'])}/kernel"] = _kernel(rng, k, cin, cout)
        counts["conv2d"] += 1

    def bn(c):
        name = f"base_model/{_tf('batch_normalization', counts['batch_normalization'])}"
        for field, arr in zip(("gamma", "beta", "moving_mean", "moving_variance"), _bn_arrays(rng, c)):
            v[f"{name}/{field}"] = arr.astype(np.float32)
        counts["batch_normalization"] += 1

    conv(7, 3, 64), bn(64)
    cin = 64
    for g, blocks in enumerate(depths):
        f = 64 * 2 ** g
        for b in range(blocks):
            if b == 0:
                conv(1, cin, 4 * f), bn(4 * f)
            conv(1, cin, f), bn(f), conv(3, f, f), bn(f), conv(1, f, 4 * f), bn(4 * f)
            cin = 4 * f
    v["head_supervised/linear_layer/dense/kernel"] = rng.normal(0, 0.01, (cin, 1000)).astype(np.float32)
    v["head_supervised/linear_layer/dense/bias"] = rng.normal(0, 0.01, 1000).astype(np.float32)
    # Present in real releases and ignored by the converter:
    v["base_model/conv2d/kernel/Momentum"] = np.zeros_like(v["base_model/conv2d/kernel"])
    v["head_contrastive/nl_0/dense/kernel"] = rng.normal(size=(cin, cin)).astype(np.float32)
    v["global_step"] = np.array(250228)
    return v


def simclr_reference(v: dict[str, np.ndarray], x: torch.Tensor, depths: tuple[int, ...]) -> torch.Tensor:
    """SimCLR resnet_v1 forward (google-research/simclr resnet.py), walking the variables by creation order."""
    ids = {"conv2d": iter(range(10_000)), "batch_normalization": iter(range(10_000))}

    def conv(x, stride):
        return _conv_hwio(x, v[f"base_model/{_tf('conv2d', next(ids['conv2d']))}/kernel"], stride, fixed=True)

    def bn(x, relu=True):
        name = f"base_model/{_tf('batch_normalization', next(ids['batch_normalization']))}"
        y = _bn(x, *(v[f"{name}/{f}"] for f in ("gamma", "beta", "moving_mean", "moving_variance")))
        return F.relu(y) if relu else y

    x = bn(conv(x, 2))
    x = F.max_pool2d(_same_pad(x, 3, 2, value=float("-inf")), 3, 2)
    for g, blocks in enumerate(depths):
        for b in range(blocks):
            stride = 2 if g > 0 and b == 0 else 1
            shortcut = bn(conv(x, stride), relu=False) if b == 0 else x
            y = bn(conv(x, 1))
            y = bn(conv(y, stride))
            y = bn(conv(y, 1), relu=False)
            x = F.relu(y + shortcut)
    return x.mean((2, 3))


def simclr_logits(v: dict[str, np.ndarray], pooled: torch.Tensor) -> torch.Tensor:
    kernel = torch.as_tensor(v["head_supervised/linear_layer/dense/kernel"])
    return pooled @ kernel + torch.as_tensor(v["head_supervised/linear_layer/dense/bias"])


def test_simclr_mapping_reproduces_tf_graph():
    arch, depths = "resnet26", (2, 2, 2, 2)  # bottleneck ResNet, shallower than ResNet-50: the mapping is depth-generic
    v = simclr_variables(depths)
    x = _image()
    expected = simclr_logits(v, simclr_reference(v, x, depths))
    got = _timm_logits(arch, simclr_to_timm(v, arch=arch), x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_simclr_checkpoint_converts_via_cli_and_loads(tmp_path, tf_tools):
    depths = (3, 4, 6, 3)
    v = simclr_variables(depths)
    tf_tools.write(tmp_path / "r50_1x_sk0" / "model.ckpt-250228", {k: torch.as_tensor(a) for k, a in v.items()})
    dst = tmp_path / "simclrv2_r50_1x_sk0.safetensors"
    assert convert_main(["simclr", str(tmp_path / "r50_1x_sk0"), str(dst)]) == 0
    backbone = build_backbone("simclrv2_r50_1x_sk0", weights=str(dst)).eval()
    x = _image(4)
    torch.testing.assert_close(_features(backbone, x), simclr_reference(v, x, depths), rtol=1e-4, atol=1e-4)


def test_simclr_ema_copy_is_used_when_asked():
    v = simclr_variables((3, 4, 6, 3))
    ema = {f"ema_model/{k}": val * 0.5 for k, val in v.items() if k.startswith("base_model/")}
    sd = simclr_to_timm({**v, **ema}, ema=True)
    expected = torch.as_tensor(v["base_model/conv2d/kernel"] * 0.5).permute(3, 2, 0, 1)
    torch.testing.assert_close(sd["conv1.weight"], expected)


def test_simclr_selective_kernel_checkpoint_is_refused():
    v = simclr_variables((3, 4, 6, 3))
    v["base_model/conv2d_999/kernel"] = np.zeros((1, 1, 64, 64), np.float32)
    with pytest.raises(WeightsError, match="selective kernels"):
        simclr_to_timm(v)


# ---------------------------------------------------------------- BYOL (Haiku names, pickled release)

def byol_params(depths: tuple[int, ...], seed: int = 0) -> tuple[dict, dict]:
    """online_params / online_state of BYOL's ResNetTorso (byol/utils/networks.py) with Haiku names."""
    rng = np.random.default_rng(seed)
    enc = "res_net50/~/"
    params: dict[str, dict] = {}
    state: dict[str, dict] = {}

    def bn(name, c):
        gamma, beta, mean, var = (a.astype(np.float32).reshape(1, 1, 1, c) for a in _bn_arrays(rng, c))
        params[name] = {"scale": gamma, "offset": beta}
        for stat, arr in (("mean_ema", mean), ("var_ema", var)):
            state[f"{name}/~/{stat}"] = {"average": arr, "hidden": arr.copy(), "counter": np.array(1000)}

    params[f"{enc}initial_conv"] = {"w": _kernel(rng, 7, 3, 64)}
    bn(f"{enc}initial_batchnorm", 64)
    cin = 64
    for g, blocks in enumerate(depths):
        f = 64 * 2 ** g
        for b in range(blocks):
            blk = f"{enc}block_group_{g}/~/block_{b}/~/"
            if b == 0:
                params[f"{blk}shortcut_conv"] = {"w": _kernel(rng, 1, cin, 4 * f)}
                bn(f"{blk}shortcut_batchnorm", 4 * f)
            for i, (k, ci, co) in enumerate(((1, cin, f), (3, f, f), (1, f, 4 * f))):
                params[f"{blk}conv_{i}"] = {"w": _kernel(rng, k, ci, co)}
                bn(f"{blk}batchnorm_{i}", co)
            cin = 4 * f
    params["classifier"] = {"w": rng.normal(0, 0.01, (cin, 1000)).astype(np.float32),
                            "b": rng.normal(0, 0.01, 1000).astype(np.float32)}
    params["projector/~/linear"] = {"w": rng.normal(size=(cin, 16)).astype(np.float32)}
    return params, state


def byol_reference(params: dict, state: dict, x: torch.Tensor, depths: tuple[int, ...]) -> torch.Tensor:
    """BYOL's ResNetTorso + classifier forward with Haiku's 'SAME' convolutions, by module name."""
    enc = "res_net50/~/"

    def bn(x, name, relu=True):
        y = _bn(x, params[name]["scale"], params[name]["offset"], state[f"{name}/~/mean_ema"]["average"],
                state[f"{name}/~/var_ema"]["average"])
        return F.relu(y) if relu else y

    x = bn(_conv_hwio(x, params[f"{enc}initial_conv"]["w"], 2, fixed=False), f"{enc}initial_batchnorm")
    x = F.max_pool2d(_same_pad(x, 3, 2, value=float("-inf")), 3, 2)
    for g, blocks in enumerate(depths):
        for b in range(blocks):
            stride = 2 if g > 0 and b == 0 else 1
            blk = f"{enc}block_group_{g}/~/block_{b}/~/"
            shortcut = x
            if b == 0:
                shortcut = bn(_conv_hwio(x, params[f"{blk}shortcut_conv"]["w"], stride, fixed=False),
                              f"{blk}shortcut_batchnorm", relu=False)
            y = bn(_conv_hwio(x, params[f"{blk}conv_0"]["w"], 1, fixed=False), f"{blk}batchnorm_0")
            y = bn(_conv_hwio(y, params[f"{blk}conv_1"]["w"], stride, fixed=False), f"{blk}batchnorm_1")
            y = bn(_conv_hwio(y, params[f"{blk}conv_2"]["w"], 1, fixed=False), f"{blk}batchnorm_2", relu=False)
            x = F.relu(y + shortcut)
    return x.mean((2, 3)) @ torch.as_tensor(params["classifier"]["w"]) + torch.as_tensor(params["classifier"]["b"])


def _fake_module(monkeypatch, dotted: str, **attrs) -> None:
    """Put a module (and its parents) into sys.modules so pickle can name classes that live there."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for key, value in attrs.items():
        setattr(sys.modules[dotted], key, value)


def write_byol_release(path, params: dict, state: dict) -> None:
    """Pickle like byol/utils/checkpointing.py: protocol 2, a NamedTuple of Haiku frozendicts of arrays."""

    class frozendict(collections.abc.Mapping):  # noqa: N801 - the name Haiku pickles
        def __init__(self, d):
            self._storage = dict(d)

        def __getitem__(self, k):
            return self._storage[k]

        def __iter__(self):
            return iter(self._storage)

        def __len__(self):
            return len(self._storage)

        def __reduce__(self):  # as haiku/_src/data_structures.py frozendict does
            return (frozendict, (self._storage,))

    frozendict.__module__, frozendict.__qualname__ = "haiku._src.data_structures", "frozendict"
    state_cls = collections.namedtuple(
        "_ByolExperimentState", ["online_params", "target_params", "online_state", "target_state", "opt_state"],
        module="byol.byol_experiment")
    lars = collections.namedtuple("LarsState", ["momentum"], module="byol.utils.optimizers")

    def freeze(d):
        return frozendict({k: frozendict(v) for k, v in d.items()})

    with pytest.MonkeyPatch.context() as mp:
        _fake_module(mp, "haiku._src.data_structures", frozendict=frozendict)
        _fake_module(mp, "byol.byol_experiment", _ByolExperimentState=state_cls)
        _fake_module(mp, "byol.utils.optimizers", LarsState=lars)
        experiment = state_cls(freeze(params), freeze(params), freeze(state), freeze(state),
                               lars(freeze({k: {"w": np.zeros(1, np.float32)} for k in list(params)[:2]})))
        with open(path, "wb") as f:
            pickle.dump({"experiment_state": experiment, "step": 1001, "rng": np.zeros(2, np.uint32)}, f, protocol=2)


def test_byol_release_converts_to_same_outputs(tmp_path):
    depths = (3, 4, 6, 3)
    params, state = byol_params(depths)
    path = tmp_path / "pretrain_res50x1.pkl"
    write_byol_release(path, params, state)
    assert "byol" not in sys.modules and "haiku" not in sys.modules
    x = _image(1)
    got = _timm_logits("resnet50", convert_byol(path), x)
    torch.testing.assert_close(got, byol_reference(params, state, x, depths), rtol=1e-4, atol=1e-4)
    assert "byol" not in sys.modules and "haiku" not in sys.modules  # nothing was imported to read it


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_byol_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"experiment_state": _Payload(marker)}, protocol=2))
    with pytest.raises(WeightsError, match=r"refused .*(os|posix)\.system"):
        convert_byol(path)
    assert not marker.exists()


def test_array_unpickler_accepts_numpy_1_names():
    unpickler = ArrayUnpickler(open(os.devnull, "rb"))
    assert unpickler.find_class("numpy.core.multiarray", "_reconstruct") is np.empty(0).__reduce__()[0]
    with pytest.raises(pickle.UnpicklingError):
        unpickler.find_class("builtins", "eval")


# ---------------------------------------------------------------- MoCo v2/v3, DINO (PyTorch releases)

def _torchvision_source(seed: int, arch: str = "resnet50") -> torch.nn.Module:
    """A torchvision ResNet, the network MoCo and DINO train, with non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    model.fc = torch.nn.Identity()
    return model.eval()


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _moco_checkpoint(source: torch.nn.Module, version: int) -> dict:
    """A MoCo pre-training checkpoint: the whole DDP-wrapped MoCo module plus training state."""
    rng = torch.Generator().manual_seed(0)
    enc = dict(source.state_dict())
    width = enc["layer4.0.conv1.weight"].shape[1] * (4 if "layer4.0.conv3.weight" in enc else 1)
    if version == 2:  # facebookresearch/moco builder.py: encoder_q/encoder_k with an MLP fc, plus the queue
        sd = {f"module.encoder_q.{k}": v for k, v in enc.items()}
        sd |= {"module.encoder_k.conv1.weight": enc["conv1.weight"] + 1,
               "module.encoder_q.fc.0.weight": torch.randn(64, width, generator=rng),
               "module.encoder_q.fc.2.weight": torch.randn(16, 64, generator=rng),
               "module.queue": torch.randn(16, 32, generator=rng), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    else:  # facebookresearch/moco-v3 builder.py: base/momentum encoders, projector in fc, predictor
        sd = {f"module.base_encoder.{k}": v for k, v in enc.items()}
        sd |= {"module.momentum_encoder.conv1.weight": enc["conv1.weight"] + 1,
               "module.base_encoder.fc.0.weight": torch.randn(64, width, generator=rng),
               "module.base_encoder.fc.1.running_mean": torch.zeros(64),
               "module.predictor.0.weight": torch.randn(64, 16, generator=rng)}
    return {"epoch": 800, "arch": "resnet50", "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]}}


def test_moco_v2_release_loads_through_registry(tmp_path):
    source = _torchvision_source(2)
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save(_moco_checkpoint(source, 2), path)
    backbone = build_backbone("moco_v2_r50", weights=str(path)).eval()
    x = _image(2)
    torch.testing.assert_close(_features(backbone, x), _features(source, x), rtol=1e-5, atol=1e-5)


def test_moco_v3_release_converts_to_same_outputs(tmp_path):
    source = _torchvision_source(3, "resnet18")  # depth-generic: a smaller ResNet keeps the test fast
    path = tmp_path / "r-18-test.pth.tar"
    torch.save(_moco_checkpoint(source, 3), path)
    sd = encoder_state_dict(path, MOCO_V3_PREFIX, arch="resnet18")
    x = _image(3)
    model = timm.create_model("resnet18", num_classes=0).eval()
    model.load_state_dict(sd, strict=True)
    torch.testing.assert_close(_features(model, x), _features(source, x), rtol=1e-5, atol=1e-5)


def test_moco_version_mismatch_names_the_right_converter(tmp_path):
    path = tmp_path / "moco_v2.pth.tar"
    torch.save(_moco_checkpoint(_torchvision_source(0, "resnet18"), 2), path)
    assert "conv1.weight" in encoder_state_dict(path, MOCO_V2_PREFIX, arch="resnet18")
    with pytest.raises(WeightsError, match="moco_v2"):
        convert_moco_v3(path)


def test_dino_release_converts_via_cli(tmp_path):
    source = _torchvision_source(4)
    release = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(dict(source.state_dict()), release)
    dst = tmp_path / "dino_r50.safetensors"
    assert convert_main(["dino", str(release), str(dst)]) == 0
    backbone = build_backbone("dino_r50", weights=str(dst)).eval()
    x = _image(5)
    torch.testing.assert_close(_features(backbone, x), _features(source, x), rtol=1e-5, atol=1e-5)


def test_dino_converter_rejects_other_files(tmp_path):
    path = tmp_path / "not_dino.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(WeightsError, match="missing"):
        convert_dino(path)


# ---------------------------------------------------------------- registry entries

@pytest.mark.parametrize("name", SSL_ENTRIES)
def test_ssl_entries_declare_a_weight_source(name):
    spec = BACKBONES.get(name)
    assert spec.arch == "resnet50" and spec.convert is not None and spec.top1
    assert spec.url or "python -m transfer.convert simclr" in spec.download_hint


@pytest.mark.parametrize("name", ["simclr_r50", "simclrv2_r50_1x_sk0"])
def test_simclr_entries_take_unnormalised_inputs_and_explain_download(name):
    spec = BACKBONES.get(name)
    assert spec.mean == (0.0, 0.0, 0.0) and spec.std == (1.0, 1.0, 1.0)
    with pytest.raises(WeightsError, match="python -m transfer.convert simclr"):
        build_backbone(name, weights="pretrained")
