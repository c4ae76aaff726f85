"""Every registered model builds and runs; checkpoints load without unpickling."""

from __future__ import annotations

import json

import pytest
import torch

from metaensemble import data, models
from metaensemble.config import DataConfig
from metaensemble.errors import CheckpointError, ConfigError
from metaensemble.methods.superweight.model import ENSEMBLES  # whole ensembles: [M, B, C] outputs
from metaensemble.methods.weightformer.generator import (
    GENERATORS,  # parameter generators, not image models
)

IMAGE_MODELS = [n for n in models.names() if n not in GENERATORS and n not in ENSEMBLES]


def test_generators_are_registered_next_to_the_image_models():
    assert set(GENERATORS) <= set(models.names())
    assert set(ENSEMBLES) <= set(models.names())


def test_each_method_module_registers_exactly_the_models_its_method_declares():
    """A lookup imports only the module declared for that name (models.registry), so a
    module must register what its method declares, nothing more, and no name of the
    library's own image models; checked in a fresh process, one module at a time."""
    import subprocess
    import sys

    from metaensemble.methods.registry import model_modules

    by_module: dict[str, set[str]] = {}
    for name, module in model_modules().items():
        by_module.setdefault(module, set()).add(name)
    assert by_module
    code = ("import importlib, json, sys; from metaensemble.models.registry import MODELS; "
            "base = set(MODELS._items); importlib.import_module(sys.argv[1]); "
            "print(json.dumps([sorted(base), sorted(set(MODELS._items) - base)]))")
    for module, declared in by_module.items():
        r = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        base, added = json.loads(r.stdout.strip().splitlines()[-1])
        assert set(added) == declared, (module, added, declared)
        assert not declared & set(base), (module, declared & set(base))


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_every_model_builds_and_runs_forward(name):
    m = models.create_model(name, num_classes=10, in_chans=3, img_size=32).eval()
    with torch.no_grad():
        y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def _first_val_batch(name: str, tmp_path):
    """One val batch of every registered dataset (file formats written here)."""
    from conftest import write_cifar, write_imagefolder

    from metaensemble.data.parquet import write_parquet

    extra: dict = {}
    if name in ("cifar10", "cifar100"):
        write_cifar(tmp_path, name)
        extra = {"root": str(tmp_path), "val_fraction": 0.2}
    elif name == "imagefolder":
        write_imagefolder(tmp_path)
        extra = {"root": str(tmp_path), "image_size": 16, "val_fraction": 0.25}
    elif name == "parquet":
        extra = {"root": str(write_parquet(data.load(DataConfig()), tmp_path / "pq"))}
    elif name == "synthetic":
        extra = {"image_size": 16, "num_samples": 60}
    s = data.load(DataConfig(name=name, **extra))
    if isinstance(s.val, data.ArraySplit):
        return s.info, next(iter(data.ArrayLoader(s.val, s.info, 4)))
    return s.info, next(iter(data.DatasetLoader(s.val, 4)))


def test_dataset_registry_is_covered():
    assert data.names() == ["cifar10", "cifar100", "digits", "imagefolder", "parquet", "synthetic"]


@pytest.mark.parametrize("dataset", data.names())
def test_models_run_on_every_registry_dataset(dataset, tmp_path):
    info, batch = _first_val_batch(dataset, tmp_path)
    assert batch["x"].shape[1:] == (info.in_chans, info.img_size, info.img_size)
    for name in ("mlp", "convnet", "resnet18", "wrn", "vgg11_bn", "deit_tiny"):
        kw = {"depth": 10, "widen_factor": 1} if name == "wrn" else {}
        m = models.create_model(name, num_classes=info.num_classes, in_chans=info.in_chans,
                                img_size=info.img_size, **kw).eval()
        with torch.no_grad():
            assert m(batch["x"]).shape == (4, info.num_classes)


def test_variants_really_differ():
    nobias = models.create_model("vgg11", num_classes=10, in_chans=3, img_size=32, bias=False)
    assert not any(n.endswith("bias") for n, _ in nobias.named_parameters())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in nobias.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in models.create_model("vgg11_bn", num_classes=10, in_chans=3, img_size=32).modules())
    nobn = models.create_model("resnet18", num_classes=10, in_chans=3, img_size=32, norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in nobn.modules())
    inet = models.create_model("resnet50", num_classes=10, in_chans=3, img_size=224)
    assert inet.stem[0].kernel_size == (7, 7)
    cifar = models.create_model("resnet50", num_classes=10, in_chans=3, img_size=32)
    assert cifar.stem[0].kernel_size == (3, 3)
    wrn = models.create_model("wrn", num_classes=100, in_chans=3, img_size=32, depth=28, widen_factor=4)
    widths = sorted({m.out_channels for m in wrn.modules() if isinstance(m, torch.nn.Conv2d)})
    assert widths == [16, 64, 128, 256]


def test_unknown_model_kwarg_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"does not take depthh; it takes: .*depth"):
        models.create_model("wrn", num_classes=10, in_chans=3, img_size=32, depthh=10)


def _saved(tmp_path, name="convnet", **kw):
    m = models.create_model(name, num_classes=10, in_chans=1, img_size=8, **kw)
    models.save_model(m, tmp_path, dataset="digits", metrics={"val_acc": 0.5})
    return m


def test_checkpoint_round_trip_rebuilds_same_function(tmp_path, monkeypatch):
    m = _saved(tmp_path, width=12).eval()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["arch"] == "convnet" and meta["kwargs"]["width"] == 12 and meta["dataset"] == "digits"
    import pickle

    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("checkpoint loading unpickled"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("checkpoint loading unpickled"))
    back = models.load(tmp_path)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(m(x), back(x)) and not back.training
    assert back.me_meta["metrics"]["val_acc"] == 0.5


def test_corrupt_weights_file(tmp_path):
    _saved(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        models.load(tmp_path)


def test_corrupt_json(tmp_path):
    _saved(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        models.load(tmp_path)


def test_mismatched_weights_name_the_tensors(tmp_path):
    _saved(tmp_path, width=8)
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["kwargs"]["width"] = 16
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"shape mismatch .*checkpoint \(8, 1, 3, 3\) vs model \(16, 1, 3, 3\)"):
        models.load(tmp_path)


def test_wrong_architecture_and_missing_files(tmp_path):
    _saved(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds a 'convnet' model, expected 'mlp'"):
        models.load(tmp_path, expect_arch="mlp")
    with pytest.raises(CheckpointError, match="does not exist"):
        models.load(tmp_path / "nope")
    (tmp_path / "model.json").unlink()
    with pytest.raises(CheckpointError, match="expected model.safetensors and model.json"):
        models.load(tmp_path)
