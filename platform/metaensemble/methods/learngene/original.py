"""The original code's aux-net checkpoints (``checkpoint.pth``) as AuxViTs, and back.

The original stores each stage's sub-layer as one instance of a per-layer-kind module:

    blocks.block.<norm1|norm2|attn.qkv|attn.proj|mlp.fc1|mlp.fc2>.instances.<stage>.<weight|bias>
    patch_embed.proj.weight/bias, pos_embed, norm.weight/bias, head.weight/bias

next to ``args`` (an argparse.Namespace), ``optimizer``, ``lr_scheduler``, ``epoch`` and
maybe ``scaler`` / ``model_ema``; or that state dict alone, with no ``model`` key, which
the original's loader accepts too. The file is read with ``weights_only=True``, allowing
argparse.Namespace and nothing else (its fields are plain values: an object of any other
type in them is refused, never built).

The tensors do not say how the layers were grouped into stages, nor how qkv splits into
heads: both are read from ``args.model`` when the file has it (the original's model names,
``aux_deit_<small|base>_patch16_224_L16_33433``: the layout after ``L``, and 12 heads, the
original's aux-nets' head count at both widths), and checked against what the caller
names; without ``args`` the caller's layout and heads are trusted.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from metaensemble.errors import CheckpointError
from metaensemble.methods.learngene.model import AuxViT, format_stages, parse_stages
from metaensemble.models import check_state_dict, create_model

AUX_HEADS = {"small": 12, "base": 12}
"""Heads of the original's aux-nets by DeiT size (``deit_<size>_patch16_224_L16``): 12 at both widths."""
_NAME_LAYOUT = re.compile(r"_(L\d+_\d+)(?=_|$)")
_NAME_HEADS = re.compile(r"_H(\d+)(?=_|$)")
SAFE_GLOBALS = [argparse.Namespace]
"""The only non-tensor types an original checkpoint.pth holds (its ``args``)."""
_ORIGINAL = re.compile(r"blocks\.block\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.instances\.(\d+)\.(weight|bias)")


def read_original(path: str | Path) -> dict:
    """The unpickled checkpoint.pth (weights_only, argparse.Namespace allowed)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"original checkpoint {p} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        # torch's message is a page of advice; keep what it refused
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?: Please use|\n|$)", str(e))
        raise CheckpointError(f"cannot read {p} as an original learngene checkpoint (weights_only, allowing "
                              f"argparse.Namespace only): {m[1].strip() if m else e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not the original's checkpoint dict")
    return obj


def name_shape(name: str) -> dict[str, object]:
    """What an original model name says of the aux-net: ``stages`` (``L16_33433``) and
    ``num_heads`` (``_H<n>``, else the original's aux-nets' 12 for ``deit_small``/``deit_base``),
    each only when the name says it."""
    out: dict[str, object] = {}
    if m := _NAME_LAYOUT.search(name):
        out["stages"] = m[1]
    if m := _NAME_HEADS.search(name):
        out["num_heads"] = int(m[1])
    elif m := re.search(r"deit_(small|base)_", name):
        out["num_heads"] = AUX_HEADS[m[1]]
    return out


def _model_state(obj: dict, path) -> dict[str, torch.Tensor]:
    """The file's state dict: its ``model``, or the file itself when it is one."""
    state = obj.get("model", obj)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} has no 'model' state dict of tensors and is not one itself "
                              f"(keys: {', '.join(map(str, obj))})")
    return state


def _args_model(obj: dict) -> str | None:
    """The file's ``args.model`` (the original's model name), if it has one."""
    name = getattr(obj.get("args"), "model", None)
    return name if isinstance(name, str) else None


def _check_name(name: str | None, path, sizes: list[int], num_heads: int) -> None:
    """The caller's layout and heads against what the file's ``args.model`` says."""
    said = name_shape(name or "")
    wrong = []
    if "stages" in said and parse_stages(said["stages"]) != sizes:
        wrong.append(f"stage layout {said['stages']} in the file, {format_stages(sizes)} asked")
    if "num_heads" in said and said["num_heads"] != num_heads:
        wrong.append(f"{said['num_heads']} heads in the file, {num_heads} asked")
    if wrong:
        raise CheckpointError(f"{path} was trained as args.model={name!r}: {'; '.join(wrong)}. Loaded as asked it "
                              f"would compute another function: pass the file's layout and heads (or None for them)")


def from_original_state(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original keys -> AuxViT keys (``...instances.s.weight`` -> ``stages.s.<sub>.weight``);
    other keys pass unchanged."""
    out = {}
    for k, v in model.items():
        m = _ORIGINAL.fullmatch(k)
        out[f"stages.{m[2]}.{m[1]}.{m[3]}" if m else k] = v
    return out


def to_original_state(aux: AuxViT) -> dict[str, torch.Tensor]:
    """``aux``'s state dict in the original's key layout (detached CPU copies)."""
    out = {}
    for k, v in aux.state_dict().items():
        if k.startswith("stages."):
            s, sub = k[len("stages."):].split(".", 1)
            sub, kind = sub.rsplit(".", 1)
            k = f"blocks.block.{sub}.instances.{s}.{kind}"
        out[k] = v.detach().cpu().clone()
    return out


def load_original(path: str | Path, stages: str | Sequence[int] | None = None, num_heads: int | None = None,
                  img_size: int = 224, patch_size: int = 16, embed_dim: int | None = None) -> AuxViT:
    """The aux-net of an original ``checkpoint.pth`` (a registered ``aux_vit``, in eval mode).

    Classes, input channels and (unless given) embed_dim come from the file's patch
    embedding and head; ``stages`` and ``num_heads`` from the caller, checked against the
    file's ``args.model`` (None: what it says, else L16_33433 and 12); image and patch
    size from the caller. A layout or head count other than the name's, every missing,
    unexpected or reshaped tensor, and a stage count other than the layout's are a
    CheckpointError naming each.
    """
    obj = read_original(path)
    name = _args_model(obj)
    said = name_shape(name or "")
    sizes = parse_stages(stages if stages is not None else said.get("stages", "L16_33433"))
    num_heads = num_heads if num_heads is not None else int(said.get("num_heads", 12))
    _check_name(name, path, sizes, num_heads)
    state = _model_state(obj, path)
    for k in ("patch_embed.proj.weight", "head.weight"):
        if k not in state:
            raise CheckpointError(f"{path}: its state dict lacks {k}, so the aux-net's shape cannot be read from it")
    w = state["patch_embed.proj.weight"]  # [embed_dim, in_chans, patch, patch]
    aux = create_model("aux_vit", num_classes=state["head.weight"].shape[0], in_chans=w.shape[1], img_size=img_size,
                       embed_dim=embed_dim or w.shape[0], num_heads=num_heads, stages=format_stages(sizes),
                       patch_size=patch_size)
    tensors = from_original_state(state)
    found = sorted({int(m[2]) for k in state if (m := _ORIGINAL.fullmatch(k))})
    problems = []
    if found != list(range(len(sizes))):
        problems.append(f"the file has {len(found)} stages (instances {found}), the layout {format_stages(sizes)} "
                        f"has {len(sizes)}")
    try:
        check_state_dict(aux, tensors, f"its 'model' (as aux_vit {format_stages(sizes)}, embed_dim {aux.embed_dim})")
    except CheckpointError as e:
        problems.append(str(e))
    if problems:
        raise CheckpointError(f"{path} is not an aux-net of this shape: {'; '.join(problems)}")
    aux.load_state_dict(tensors, strict=True)
    return aux.eval()
