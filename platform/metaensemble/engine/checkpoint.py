"""The engine's per-epoch checkpoint folder and the RNG state it carries.

A checkpoint (one per epoch) is a folder::

    model.safetensors, model.json      latest weights of the trained module (loadable)
    best/model.safetensors, model.json best weights so far by ``train.select_metric``
    optimizer.pt                       optimiser state and the schedule's step (tensors only)
    ranks.pt                           every rank's RNG (torch CPU/CUDA, numpy, python) and
                                       the method's ``state_dict()``, one entry per rank
    state.json                         epochs done, global step, best score/epoch, MLflow run id

Everything is read back without unpickling arbitrary objects (``weights_only=True``).
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaensemble.models import read_weights, save_model, save_weights


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                     *np_state[2:]],
           "python": _tuples_to_lists(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_lists_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _tuples_to_lists(x):
    return [_tuples_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _lists_to_tuples(x):
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, list) else x


def write_checkpoint(base, best_weights, optimizer, scheduler, state, info, ranks) -> Path:
    """Rank 0: a new temporary checkpoint folder (see the module docstring); the loop's
    report hands it to Ray and deletes it. ``ranks`` is every rank's (RNG state, method
    state)."""
    d = Path(tempfile.mkdtemp(prefix="me-ckpt-"))
    if hasattr(base, "me_spec"):  # a loadable model; a method's composite module: weights alone
        save_model(base, d, dataset=info.name, dataset_info=info.to_dict())
    else:
        save_weights(base, d)
    if best_weights is not None:
        from safetensors.torch import save_file

        (d / "best").mkdir()
        save_file({k: v.contiguous() for k, v in best_weights.items()}, str(d / "best" / "model.safetensors"))
        if (d / "model.json").is_file():
            (d / "best" / "model.json").write_text((d / "model.json").read_text())
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, d / "optimizer.pt")
    torch.save([{"rng": r, "method": m} for r, m in ranks], d / "ranks.pt")
    (d / "state.json").write_text(json.dumps(state))
    return d


def read_checkpoint(d: Path, rank: int, device) -> dict[str, Any]:
    """Everything this rank needs to resume (loaded without unpickling arbitrary objects).
    A checkpoint from a different number of workers restores rank 0's method state and
    leaves the other ranks' RNG freshly seeded."""
    extra = torch.load(d / "optimizer.pt", map_location=device, weights_only=True)
    ranks = torch.load(d / "ranks.pt", map_location="cpu", weights_only=True)
    mine = ranks[rank] if rank < len(ranks) else None
    return {
        "state": json.loads((d / "state.json").read_text()),
        "weights": read_weights(d),
        "best": read_weights(d / "best") if (d / "best").is_dir() else None,
        "optimizer": extra["optimizer"],
        "rng": mine["rng"] if mine else None,
        "method": (mine or ranks[0])["method"],
    }


def checkpoint_owner(d: Path) -> str | None:
    """The MLflow run id a checkpoint folder belongs to (a pack's members share one Ray run)."""
    return json.loads((d / "state.json").read_text()).get("run_id")


def epochs_done(run_dir: str) -> int:
    """Epochs done by the checkpoint a rerun of the Ray run folder ``run_dir`` (a local
    path or a pyarrow filesystem URI, as ``storage_path``) resumes from: the one Ray Train
    recorded last (``checkpoint_manager_snapshot.json``: a folder uploaded but not yet
    recorded is not restored), else the newest folder with a ``state.json``; 0 for none."""
    from pyarrow import fs

    from metaensemble.data.parquet import filesystem as open_filesystem

    filesystem, root = open_filesystem(run_dir)
    root = root.rstrip("/")

    def state(folder: str) -> int | None:
        try:
            with filesystem.open_input_stream(f"{root}/{folder}/state.json") as f:
                return int(json.loads(f.read().decode())["epochs_done"])
        except (OSError, ValueError, KeyError, TypeError):  # absent, or a folder Ray had not finished
            return None

    try:
        with filesystem.open_input_stream(f"{root}/checkpoint_manager_snapshot.json") as f:
            latest = json.loads(f.read().decode())["latest_checkpoint_result"]["checkpoint_dir_name"]
        if (done := state(latest)) is not None:
            return done
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True))
    for d in sorted((i.base_name for i in found if i.type == fs.FileType.Directory
                     and i.base_name.startswith("checkpoint_")), reverse=True):
        if (done := state(d)) is not None:
            return done
    return 0


def resumed_train_split(data_cfg, seed: int, run_dir: str):
    """The streamed train split as a run starting now reads it: its file order begins at
    the epoch the checkpoint in ``run_dir`` resumes from (``epochs_done``). Ray Train calls
    it (through ``functools.partial``) at every start of the worker group."""
    from metaensemble.data.parquet import ray_datasets

    return ray_datasets(data_cfg, seed=seed, first_epoch=epochs_done(run_dir), splits=("train",))[0]["train"]
