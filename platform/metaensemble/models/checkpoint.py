"""Checkpoints: ``model.safetensors`` (tensors only) + ``model.json`` (how to rebuild).

Loading never unpickles: the JSON names a registered architecture and its kwargs, the
safetensors file holds the state dict, and both are checked against each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from metaensemble.errors import CheckpointError, ConfigError
from metaensemble.models.registry import MODELS, create_model

WEIGHTS, META = "model.safetensors", "model.json"
FORMAT_VERSION = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP, FSDP (1) and torch.compile wrappers, and nothing else:
    a model's own submodule that happens to be called ``module`` stays."""
    from torch.nn.parallel import DistributedDataParallel

    wrappers: tuple[type, ...] = (DistributedDataParallel,)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrappers += (FullyShardedDataParallel,)
    except ImportError:  # pragma: no cover - builds without distributed
        pass
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def state_dict_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}


def save_model(model: nn.Module, directory: str | Path, **meta: Any) -> Path:
    """Write model.safetensors + model.json into ``directory``.

    ``meta`` adds fields to model.json (dataset, metrics, seed, ...).
    """
    base = unwrap(model)
    spec = getattr(base, "me_spec", None)
    if spec is None:
        raise CheckpointError("model was not built by metaensemble.models.create_model; cannot record how to rebuild it")
    d = save_weights(base, directory)
    body = {"format_version": FORMAT_VERSION, **spec, "num_classes": spec["kwargs"]["num_classes"], **meta}
    (d / META).write_text(json.dumps(body, indent=2, sort_keys=True, default=_json_default))
    return d


def save_weights(model: nn.Module, directory: str | Path) -> Path:
    """Write only model.safetensors (any module: a method's composite training module
    too, whose structure the method itself restores)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = state_dict_tensors(model)
    # Tied weights would be stored twice by safetensors' plain save_file: clone them apart.
    seen: dict[int, str] = {}
    for k, v in tensors.items():
        ptr = v.data_ptr()
        if ptr in seen:
            tensors[k] = v.clone()
        seen[ptr] = k
    save_file(tensors, str(d / WEIGHTS))
    return d


def _json_default(o: Any):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_meta(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    if not (d / META).is_file() or not (d / WEIGHTS).is_file():
        raise CheckpointError(f"{d} is not a checkpoint: expected {WEIGHTS} and {META} in it")
    try:
        meta = json.loads((d / META).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{d / META} is corrupt (not JSON): {e}") from None
    if not isinstance(meta, dict) or "arch" not in meta or "kwargs" not in meta:
        raise CheckpointError(f"{d / META} lacks 'arch'/'kwargs'; not a metaensemble checkpoint")
    return meta


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: {e}") from None


def check_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise CheckpointError naming every missing, unexpected or reshaped tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    reshaped = [f"{k}: checkpoint {got[k]} vs model {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    if missing or unexpected or reshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected)}")
        if reshaped:
            parts.append(f"shape mismatch {len(reshaped)}: {'; '.join(reshaped)}")
        raise CheckpointError(f"{where} does not match its architecture: {', '.join(parts)}")


def local_dir(uri: str | Path) -> Path:
    """A local folder for ``uri``: a path, or an MLflow URI (runs:/, models:/, ...)
    downloaded through the configured tracking server."""
    s = str(uri)
    if "://" in s or s.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import mlflow

        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=s))
        except Exception as e:  # noqa: BLE001 - MLflow raises many types for a bad URI
            raise CheckpointError(f"cannot download checkpoint {s}: {e}") from None
    p = Path(s).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def load(uri: str | Path, *, expect_arch: str | None = None, map_location: str = "cpu") -> nn.Module:
    """Rebuild a registered model from a checkpoint folder or MLflow URI, in eval mode.

    The returned model has ``me_spec`` (arch, kwargs) and ``me_meta`` (all of model.json).
    """
    d = local_dir(uri)
    meta = read_meta(d)
    if meta["arch"] not in MODELS:
        raise CheckpointError(f"{d / META} names architecture {meta['arch']!r}, which is not registered; known: {', '.join(MODELS.names())}")
    if expect_arch is not None and meta["arch"] != expect_arch:
        raise CheckpointError(f"{d} holds a {meta['arch']!r} model, expected {expect_arch!r}")
    try:
        model = create_model(meta["arch"], **meta["kwargs"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{d / META}: cannot rebuild {meta['arch']!r} from its kwargs: {e}") from None
    tensors = read_weights(d)
    check_state_dict(model, tensors, str(d))
    model.load_state_dict(tensors, strict=True)
    model.me_meta = meta  # type: ignore[attr-defined]
    return model.to(map_location).eval()
