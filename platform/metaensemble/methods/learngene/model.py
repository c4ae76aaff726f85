"""The aux-net, its descendants and the expansion from one to the other.

    AuxViT          L layers grouped into stages; each stage owns ONE pre-norm block
                    (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2) that all its
                    layers run; only the stochastic-depth rate is per layer
    DescendantViT   a plain ViT of depth D with independent blocks (``blocks.i.*``: the
                    same sub-layer names as the aux-net's ``stages.s.*``)
    expand          descendant block i <- a copy of stage ``layers_source[i]``

Both are patch embedding + learned position embedding (no class token) + blocks, then
(aux-net and ``preserving`` descendants) LayerNorm per token, mean over tokens, head:
timm's VisionTransformer(class_token=False, global_pool="avg", fc_norm=False) with
LayerNorm eps 1e-5. A ``deit`` descendant is the original's timm DeiT: embed/64 heads,
mean over tokens then LayerNorm (eps 1e-6), then head.

A stage layout is written ``L<depth>_<one digit per stage>``: ``L16_33433`` is 16 layers
in stages of 3, 3, 4, 3, 3. A saved AuxViT (``save_model``) is the learngene: its
model.json records the layout.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from functools import partial
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, PatchEmbed, calculate_drop_path_rates, trunc_normal_
from timm.models.vision_transformer import Block

from metaensemble.errors import ConfigError
from metaensemble.models.registry import create_model, register_model
from metaensemble.models.timm_models import default_patch

AUX_EPS, DEIT_EPS = 1e-5, 1e-6
Style = Literal["preserving", "deit"]
STYLES = ("preserving", "deit")
_LAYOUT = re.compile(r"L(\d+)_([1-9]+)")


# ---- the stage layout -----------------------------------------------------------------------

def parse_stages(spec: str | Sequence[int]) -> list[int]:
    """Stage sizes of a layout: ``"L16_33433"`` -> [3, 3, 4, 3, 3]; a list of sizes is checked and returned."""
    if isinstance(spec, str):
        m = _LAYOUT.fullmatch(spec.strip())
        if m is None:
            raise ConfigError(f"stage layout {spec!r} is malformed: expected 'L<depth>_<one digit 1-9 per stage>', "
                              "e.g. 'L16_33433' (16 layers in stages of 3, 3, 4, 3, 3), or a list of stage sizes")
        depth, sizes = int(m[1]), [int(c) for c in m[2]]
        if sum(sizes) != depth:
            raise ConfigError(f"stage layout {spec!r}: its stages {sizes} hold {sum(sizes)} layers, not the {depth} "
                              f"it names; the stage sizes must sum to the depth (e.g. 'L{sum(sizes)}_{m[2]}')")
        return sizes
    sizes = list(spec)
    if not sizes or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes):
        raise ConfigError(f"stage layout {sizes!r} is invalid: give at least one stage, each of >= 1 layers "
                          "(a list of ints or a string such as 'L16_33433')")
    return sizes


def format_stages(sizes: Sequence[int]) -> str | list[int]:
    """The string form ``L<depth>_<digits>`` when every stage has 1-9 layers, else the list."""
    sizes = parse_stages(sizes)
    return f"L{sum(sizes)}_{''.join(map(str, sizes))}" if max(sizes) <= 9 else sizes


def layer_stages(sizes: Sequence[int]) -> list[int]:
    """Layer -> stage map: [3, 3, 4, 3, 3] -> [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4]."""
    return [s for s, n in enumerate(sizes) for _ in range(n)]


def default_layers_source(stages: str | Sequence[int], depth: int) -> list[int]:
    """Stage of each block of a depth-``depth`` descendant, spread proportionally to the stage sizes.

    depth >= number of stages S: each stage gets one block, then each next block goes to
    the stage with the most aux layers per block so far (size / blocks; ties to the
    earlier stage): Adams' apportionment, so every stage is used, the counts are
    proportional, depth L gives exactly the aux layout and 2L doubles it. depth < S: block
    i takes the stage at the same relative depth of the aux-net, aux layer
    floor((i + 1/2) L / depth). For L16_33433: D=4 -> 0,2,3,4; D=6 -> 0,1,2,2,3,4;
    D=8 -> 0,0,1,1,2,2,3,4; D=12 -> 0,0,0,1,1,2,2,2,3,3,4,4 (the paper's list,
    0,0,0,1,1,1,2,2,3,3,4,4, gives the 4-layer stage fewer blocks than the 3-layer ones, so
    no proportional rule yields it: pass it explicitly); D=20 -> blocks per stage 4,4,5,4,3.
    """
    sizes = parse_stages(stages)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"descendant depth must be an int >= 1, got {depth!r}")
    n_layers, n_stages = sum(sizes), len(sizes)
    if depth < n_stages:
        aux = layer_stages(sizes)
        return [aux[(2 * i + 1) * n_layers // (2 * depth)] for i in range(depth)]
    counts = [1] * n_stages
    for _ in range(depth - n_stages):
        s = max(range(n_stages), key=lambda s: Fraction(sizes[s], counts[s]))  # max keeps the first of ties
        counts[s] += 1
    return [s for s, c in enumerate(counts) for _ in range(c)]


def check_layers_source(src: Sequence[int], depth: int, n_stages: int) -> list[int]:
    """``src`` as a list if it is a valid layers_source (length ``depth``, indices in
    [0, n_stages), non-decreasing); else ConfigError naming every problem."""
    src = list(src)
    valid = (f"layers_source must hold {depth} stage indices (one per descendant block), each in "
             f"0..{n_stages - 1}, in non-decreasing order")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in src):
        raise ConfigError(f"layers_source {src!r} holds non-integers; {valid}")
    problems = []
    if len(src) != depth:
        problems.append(f"it has {len(src)} entries, the descendant has {depth} blocks")
    bad = [f"block {i}: {s}" for i, s in enumerate(src) if not 0 <= s < n_stages]
    if bad:
        problems.append(f"stage index out of range (the learngene has {n_stages} stages) at {', '.join(bad)}")
    down = [f"block {i}: {src[i - 1]} -> {src[i]}" for i in range(1, len(src)) if src[i] < src[i - 1]]
    if down:
        problems.append(f"it decreases at {', '.join(down)}")
    if problems:
        raise ConfigError(f"layers_source {src} is invalid: {'; '.join(problems)}. {valid}")
    return src


# ---- the models -----------------------------------------------------------------------------

def _block(dim: int, num_heads: int, mlp_ratio: float, drop_path: float, eps: float) -> Block:
    return Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=drop_path,
                 norm_layer=partial(nn.LayerNorm, eps=eps), mlp_layer=Mlp)


def _check_shape(embed_dim: int, num_heads: int, img_size: int, patch_size: int) -> None:
    if num_heads < 1 or embed_dim % num_heads:
        raise ConfigError(f"embed_dim {embed_dim} must be a multiple of num_heads {num_heads} (>= 1)")
    if patch_size < 1 or img_size % patch_size:
        raise ConfigError(f"patch_size {patch_size} must divide img_size {img_size}")


def _init_weights(model: nn.Module) -> None:
    """timm's ViT init: truncated normal (std 0.02) for Linear weights and the position
    embedding, zero biases; LayerNorm and the patch conv keep PyTorch's defaults."""
    trunc_normal_(model.pos_embed, std=0.02)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _ViT(nn.Module):
    """What the aux-net and the descendants share: patch + position embedding, final norm, head."""

    def __init__(self, num_classes: int, in_chans: int, img_size: int, patch_size: int, embed_dim: int,
                 num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        _check_shape(embed_dim, num_heads, img_size, patch_size)
        self.num_classes, self.in_chans, self.img_size, self.patch_size = num_classes, in_chans, img_size, patch_size
        self.embed_dim, self.num_heads, self.mlp_ratio = embed_dim, num_heads, mlp_ratio
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


class AuxViT(_ViT):
    """The aux-net: layers grouped into stages that each run one shared block.

    ``stages.s`` is stage s's block; ``layer_to_stage[i]`` the stage layer i runs;
    ``drop_path[i]`` layer i's stochastic depth (rates linear in i from 0 to
    ``drop_path_rate``, per layer because the block is shared). Input [B, in_chans,
    img_size, img_size] -> logits [B, num_classes].
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, patch_size: int = 16,
                 embed_dim: int = 384, num_heads: int = 12, stages: str | Sequence[int] = "L16_33433",
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0) -> None:
        super().__init__(num_classes, in_chans, img_size, patch_size, embed_dim, num_heads, mlp_ratio, AUX_EPS)
        self.stage_sizes = parse_stages(stages)
        self.layer_to_stage = layer_stages(self.stage_sizes)
        self.depth = len(self.layer_to_stage)
        self.stages = nn.ModuleList(_block(embed_dim, num_heads, mlp_ratio, 0.0, AUX_EPS) for _ in self.stage_sizes)
        self.drop_path = nn.ModuleList(DropPath(r) if r > 0 else nn.Identity()
                                       for r in calculate_drop_path_rates(drop_path_rate, self.depth))
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> normed tokens [B, N, embed_dim]."""
        x = self.patch_embed(x) + self.pos_embed
        for s, drop in zip(self.layer_to_stage, self.drop_path, strict=True):
            block = self.stages[s]
            x = x + drop(block.attn(block.norm1(x)))
            x = x + drop(block.mlp(block.norm2(x)))
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean(1))


class DescendantViT(_ViT):
    """A plain ViT of ``depth`` independent blocks (``blocks.i``), in the aux-net's layout
    (``preserving``) or the original's DeiT layout (``deit``; see the module docstring).
    ``num_heads`` None: 12 (the aux-net's) for preserving, embed_dim // 64 for deit."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, depth: int = 12,
                 embed_dim: int = 384, num_heads: int | None = None, patch_size: int = 16, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, style: Style = "preserving") -> None:
        if style not in STYLES:
            raise ConfigError(f"descendant style {style!r} is unknown; valid: {', '.join(STYLES)}")
        if depth < 1:
            raise ConfigError(f"descendant depth must be >= 1, got {depth}")
        heads = num_heads or (12 if style == "preserving" else max(1, embed_dim // 64))
        eps = AUX_EPS if style == "preserving" else DEIT_EPS
        super().__init__(num_classes, in_chans, img_size, patch_size, embed_dim, heads, mlp_ratio, eps)
        self.style, self.depth = style, depth
        self.blocks = nn.Sequential(*(_block(embed_dim, heads, mlp_ratio, r, eps)
                                      for r in calculate_drop_path_rates(drop_path_rate, depth)))
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> tokens [B, N, embed_dim] (normed only in the preserving style)."""
        x = self.blocks(self.patch_embed(x) + self.pos_embed)
        return self.norm(x) if self.style == "preserving" else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x).mean(1)
        return self.head(x if self.style == "preserving" else self.norm(x))


@register_model("aux_vit")
def aux_vit(num_classes: int, in_chans: int, img_size: int, embed_dim: int = 384, num_heads: int = 12,
            stages: str | list[int] = "L16_33433", patch_size: int | None = None, mlp_ratio: float = 4.0,
            drop_path_rate: float = 0.0) -> AuxViT:
    """Aux-S: embed_dim 384; Aux-B: embed_dim 768 (12 heads in both)."""
    return AuxViT(num_classes, in_chans, img_size, patch_size or default_patch(img_size), embed_dim, num_heads,
                  stages, mlp_ratio, drop_path_rate)


@register_model("descendant_vit")
def descendant_vit(num_classes: int, in_chans: int, img_size: int, depth: int = 12, embed_dim: int = 384,
                   num_heads: int | None = None, patch_size: int | None = None, mlp_ratio: float = 4.0,
                   drop_path_rate: float = 0.0, style: Style = "preserving") -> DescendantViT:
    return DescendantViT(num_classes, in_chans, img_size, depth, embed_dim, num_heads,
                         patch_size or default_patch(img_size), mlp_ratio, drop_path_rate, style)


# ---- learngene and expansion ----------------------------------------------------------------

class Learngene(NamedTuple):
    """The learngene: stage blocks (``stages.s.*``), patch and position embedding, final
    norm and head, detached copies on the CPU; and the stage sizes."""

    tensors: dict[str, torch.Tensor]
    stages: list[int]


def learngene_state(aux: AuxViT) -> Learngene:
    """The learngene of ``aux`` (all of its state: the aux-net has nothing else)."""
    return Learngene({k: v.detach().cpu().clone() for k, v in aux.state_dict().items()}, list(aux.stage_sizes))


def _stage_of(key: str) -> tuple[int, str] | None:
    """``stages.3.attn.qkv.weight`` -> (3, ``attn.qkv.weight``); None for shared tensors."""
    if not key.startswith("stages."):
        return None
    s, rest = key[len("stages."):].split(".", 1)
    return int(s), rest


def descendant_state(aux: AuxViT, layers_source: Sequence[int], head: bool = True) -> dict[str, torch.Tensor]:
    """The descendant state dict (block i <- stage layers_source[i]), as views of ``aux``'s
    tensors; without ``head.*`` unless ``head``."""
    state = aux.state_dict()
    per_stage: dict[int, dict[str, torch.Tensor]] = {}
    out = {}
    for k, v in state.items():
        sk = _stage_of(k)
        if sk is not None:
            per_stage.setdefault(sk[0], {})[sk[1]] = v
        elif head or not k.startswith("head."):
            out[k] = v
    for i, s in enumerate(layers_source):
        out.update({f"blocks.{i}.{k}": v for k, v in per_stage[s].items()})
    return out


def expand(aux: AuxViT, depth: int, layers_source: Sequence[int] | None = None, style: Style = "preserving",
           num_classes: int | None = None, *, drop_path_rate: float = 0.0, copy_head: bool = True) -> DescendantViT:
    """A depth-``depth`` descendant of ``aux`` (a registered ``descendant_vit``, saveable).

    Block i is an independent copy of stage ``layers_source[i]`` (default:
    ``default_layers_source``); patch and position embedding and final norm are copied; the
    head only with ``copy_head`` and when ``num_classes`` (default: the aux-net's) equals
    the aux-net's, else it keeps its fresh init. A ``preserving`` descendant with the aux depth and layout computes
    exactly the aux-net's function. A ``deit`` one gets the same tensors (every shape
    matches: heads only split qkv differently) but embed/64 heads, the norm after pooling
    and eps 1e-6, so it is a different function: an initialisation, not a copy.
    """
    src = (default_layers_source(aux.stage_sizes, depth) if layers_source is None
           else check_layers_source(layers_source, depth, len(aux.stage_sizes)))
    num_classes = aux.num_classes if num_classes is None else num_classes
    same_head = copy_head and num_classes == aux.num_classes
    desc = create_model("descendant_vit", num_classes=num_classes, in_chans=aux.in_chans, img_size=aux.img_size,
                        depth=depth, embed_dim=aux.embed_dim, num_heads=aux.num_heads if style == "preserving" else None,
                        patch_size=aux.patch_size, mlp_ratio=aux.mlp_ratio, drop_path_rate=drop_path_rate, style=style)
    ref = aux.pos_embed
    desc.to(device=ref.device, dtype=ref.dtype)
    # load_state_dict copies into the descendant's own parameters: the blocks never share storage.
    missing, unexpected = desc.load_state_dict(descendant_state(aux, src, head=same_head), strict=False)
    expected_missing = set() if same_head else {k for k in desc.state_dict() if k.startswith("head.")}
    if unexpected or set(missing) != expected_missing:  # pragma: no cover - the two layouts are built together
        raise RuntimeError(f"expansion out of step with DescendantViT: missing {missing}, unexpected {unexpected}")
    desc.layers_source = src  # type: ignore[attr-defined]
    return desc
