"""Learngene models: the method's testable properties 1-6 (docs/learngene.md
describes the method), numbered as below, the default layers_source, the original checkpoints,
and the learngene as a saved model.

    1. Stage sharing        AuxViT: 5 unique blocks, layer -> stage map, Aux-S/B parameter counts
    2. Shared gradient      AuxViT vs its unrolled descendant
    3. Plain timm ViT       AuxViT vs timm VisionTransformer holding stage(i) in block i
    4. Expansion            expand: bit-exact, independent copies
    5. Validation           check_layers_source / parse_stages
    6. Function-preserving  expand(style="preserving") at the aux depth; "deit" is not
   (layout)                 default_layers_source for every depth 1..2L
   (original)               original.load_original / to_original_state
   (checkpoints)            save_model / load of AuxViT and DescendantViT

Everything but the parameter count (meta device) runs on 16x16 inputs, embed 48.
"""

from __future__ import annotations

import argparse
import math
import pickle
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from metaensemble.errors import CheckpointError, ConfigError
from metaensemble.methods.learngene.model import (
    AuxViT,
    DescendantViT,
    check_layers_source,
    default_layers_source,
    expand,
    learngene_state,
    parse_stages,
)
from metaensemble.methods.learngene.original import load_original, read_original, to_original_state
from metaensemble.models import create_model, load, save_model
from metaensemble.validation import load_config

SUBLAYERS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
SMALL = {"num_classes": 10, "in_chans": 3, "img_size": 16, "patch_size": 4, "embed_dim": 48}


def small_aux(stages: str = "L16_33433", num_heads: int = 12, seed: int = 0, **kw) -> AuxViT:
    torch.manual_seed(seed)
    return create_model("aux_vit", **{**SMALL, **kw}, num_heads=num_heads, stages=stages).eval()


@pytest.fixture(scope="module")
def aux() -> AuxViT:
    return small_aux()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# ---- 1. stage sharing -------------------------------------------------------------------------

def test_stages_share_one_block_each(aux):
    assert aux.stage_sizes == [3, 3, 4, 3, 3]
    assert aux.layer_to_stage == [0] * 3 + [1] * 3 + [2] * 4 + [3] * 3 + [4] * 3
    # the parameters each layer runs: 5 distinct sets, one per stage
    per_layer = [frozenset(p.data_ptr() for p in aux.stages[s].parameters()) for s in aux.layer_to_stage]
    assert len(set(per_layer)) == 5
    block_params = {n for n, _ in aux.named_parameters() if n.startswith("stages.")}
    assert block_params == {f"stages.{s}.{sub}.{wb}" for s in range(5) for sub in SUBLAYERS for wb in ("weight", "bias")}
    assert len({p.data_ptr() for p in aux.parameters()}) == len(list(aux.parameters())) == 5 * 12 + 7
    assert not hasattr(aux, "cls_token") and aux.no_weight_decay() == {"pos_embed"}
    assert aux.norm.eps == 1e-5 and aux.stages[0].norm1.eps == 1e-5


@pytest.mark.parametrize("embed_dim,expected", [(384, 9_628_648), (768, 36_951_016)])
def test_parameter_counts_aux_s_and_b(embed_dim, expected):
    with torch.device("meta"):
        m = create_model("aux_vit", num_classes=1000, in_chans=3, img_size=224, embed_dim=embed_dim)
    assert m.patch_size == 16 and m.num_heads == 12 and m.stage_sizes == [3, 3, 4, 3, 3]
    assert sum(p.numel() for p in m.parameters()) == expected


def test_drop_path_is_per_layer_and_linear():
    m = create_model("aux_vit", **SMALL, num_heads=4, stages="L4_22", drop_path_rate=0.3)
    assert [getattr(d, "drop_prob", 0.0) for d in m.drop_path] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    # the shared blocks hold none: the rate belongs to the layer, not the stage
    assert all(isinstance(getattr(b, f"drop_path{i}"), nn.Identity) for b in m.stages for i in (1, 2))
    x = torch.randn(2, 3, 16, 16)
    m.train()
    assert not torch.equal(m(x), m(x))  # stochastic depth active in train mode
    m.eval()
    assert torch.equal(m(x), m(x))


# ---- 2. shared gradient = sum of unrolled gradients ---------------------------------------------

def test_shared_gradient_is_sum_of_unrolled_gradients(aux, x):
    shared = small_aux(seed=3).double()
    unrolled = expand(shared, shared.depth)
    assert unrolled.layers_source == shared.layer_to_stage
    xd, w = x.double(), torch.randn(4, 10, dtype=torch.float64)
    (shared(xd) * w).sum().backward()
    (unrolled(xd) * w).sum().backward()
    for s in range(5):
        layers = [i for i, t in enumerate(shared.layer_to_stage) if t == s]
        for name, p in shared.stages[s].named_parameters():
            summed = sum(unrolled.blocks[i].get_parameter(name).grad for i in layers)
            assert p.grad.abs().max() > 0
            torch.testing.assert_close(p.grad, summed, rtol=1e-9, atol=1e-12, msg=f"stage {s} {name}")
    for name in ("pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight"):
        torch.testing.assert_close(shared.get_parameter(name).grad, unrolled.get_parameter(name).grad)


# ---- 3. the aux forward is a plain timm ViT -----------------------------------------------------

def test_aux_equals_plain_timm_vit(aux, x):
    from timm.models.vision_transformer import VisionTransformer

    # class_token=False + global_pool="avg" + fc_norm=False: the final norm per token, then the
    # mean over tokens (fc_norm=None would move the norm after pooling); eps via norm_layer.
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=10, global_pool="avg", embed_dim=48,
                            depth=16, num_heads=12, mlp_ratio=4.0, qkv_bias=True, class_token=False, fc_norm=False,
                            final_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-5)).eval()
    src = aux.state_dict()
    state = {}
    for k in vit.state_dict():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            state[k] = src[f"stages.{aux.layer_to_stage[int(i)]}.{rest}"]
        else:
            state[k] = src[k]
    vit.load_state_dict(state, strict=True)
    assert vit.norm.eps == 1e-5 and isinstance(vit.fc_norm, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(aux(x), vit(x), rtol=0, atol=1e-5)


# ---- 4. expansion: bit-exact, independent copies ------------------------------------------------

def test_expand_copies_bit_exact_and_independent(aux):
    src = [0, 0, 1, 2, 2, 4]
    d = expand(aux, 6, src)
    assert isinstance(d, DescendantViT) and len(d.blocks) == 6 and d.layers_source == src
    for i, s in enumerate(src):
        for name, p in d.blocks[i].named_parameters():
            q = aux.stages[s].get_parameter(name)
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), (i, name)
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "norm.weight", "norm.bias",
                 "head.weight", "head.bias"):
        assert torch.equal(d.get_parameter(name), aux.get_parameter(name)), name
    ptrs = [p.data_ptr() for p in d.parameters()]
    assert len(set(ptrs)) == len(ptrs)
    # blocks 0 and 1 both come from stage 0: training block 0 leaves block 1 and the aux alone
    before1, before_aux = d.blocks[1].attn.qkv.weight.clone(), aux.stages[0].attn.qkv.weight.clone()
    with torch.no_grad():
        d.blocks[0].attn.qkv.weight.add_(1.0)
    assert torch.equal(d.blocks[1].attn.qkv.weight, before1)
    assert torch.equal(aux.stages[0].attn.qkv.weight, before_aux)
    assert not torch.equal(d.blocks[0].attn.qkv.weight, before1)


def test_learngene_state_is_the_stage_blocks_embeddings_norm_and_head(aux):
    lg = learngene_state(aux)
    assert lg.stages == [3, 3, 4, 3, 3]
    shared = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "norm.weight", "norm.bias",
              "head.weight", "head.bias"}
    blocks = {f"stages.{s}.{sub}.{wb}" for s in range(5) for sub in SUBLAYERS for wb in ("weight", "bias")}
    assert set(lg.tensors) == shared | blocks
    assert all(torch.equal(v, aux.state_dict()[k]) and v.data_ptr() != aux.state_dict()[k].data_ptr()
               for k, v in lg.tensors.items())


# ---- 5. validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("src,depth,match", [
    ([0, 1, 2, 3], 5, r"has 4 entries, the descendant has 5 blocks"),
    ([0, 1, 5, -1], 4, r"out of range .*5 stages.* block 2: 5, block 3: -1"),
    ([0, 2, 1, 4], 4, r"decreases at block 2: 2 -> 1"),
    ([0, 1.5, 2], 3, r"non-integers"),
])
def test_invalid_layers_source_refused(aux, src, depth, match):
    with pytest.raises(ConfigError, match=match) as e:
        check_layers_source(src, depth, 5)
    assert "0..4" in str(e.value) and "non-decreasing" in str(e.value)  # what is valid
    with pytest.raises(ConfigError, match=match):
        expand(aux, depth, src)


def test_every_layers_source_problem_named_at_once():
    with pytest.raises(ConfigError) as e:
        check_layers_source([3, 7, 1], 4, 5)
    assert all(s in str(e.value) for s in ("has 3 entries", "block 1: 7", "decreases at block 2"))
    assert check_layers_source((0, 0, 4), 3, 5) == [0, 0, 4]


@pytest.mark.parametrize("spec,match", [
    ("L15_33433", r"hold 16 layers, not the 15 it names.*must sum to the depth"),
    ("L16-33433", r"malformed.*L<depth>_"),
    ("16_33433", r"malformed"),
    ("L16_3343a", r"malformed"),
    ("L4_040", r"malformed"),
    ([3, 0, 2], r"each of >= 1 layers"),
    ([], r"at least one stage"),
])
def test_stage_layout_refused(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_stages(spec)
    with pytest.raises(ConfigError, match=match):
        create_model("aux_vit", **SMALL, stages=spec)


def test_stage_layout_parsed():
    assert parse_stages("L16_33433") == [3, 3, 4, 3, 3]
    assert parse_stages("L1_1") == [1] and parse_stages([2, 11]) == [2, 11]


# ---- 6. function-preserving descendants ---------------------------------------------------------

def test_preserving_descendant_of_aux_depth_reproduces_aux(aux, x):
    d = expand(aux, 16).eval()
    assert d.layers_source == aux.layer_to_stage and d.num_heads == 12 and d.norm.eps == 1e-5
    with torch.no_grad():
        torch.testing.assert_close(d(x), aux(x), rtol=0, atol=1e-5)


def test_deit_descendant_is_not_function_preserving(aux, x):
    # embed/64 heads (1 here, 6 for S), norm after the mean, eps 1e-6: same tensors, other function
    d = expand(aux, 16, style="deit").eval()
    assert d.num_heads == 1 and d.norm.eps == 1e-6 and d.style == "deit"
    assert all(torch.equal(v, aux.state_dict()[k]) for k, v in d.state_dict().items() if not k.startswith("blocks."))
    assert torch.equal(d.blocks[15].mlp.fc2.weight, aux.stages[4].mlp.fc2.weight)
    with torch.no_grad():
        assert (d(x) - aux(x)).abs().max() > 1e-3
    with torch.device("meta"):
        s = create_model("descendant_vit", num_classes=1000, in_chans=3, img_size=224, style="deit")
    assert s.num_heads == 6


# ---- the default layers_source ------------------------------------------------------------------

@pytest.mark.parametrize("stages", ["L16_33433", "L12_444", "L9_171", [5, 1, 1, 2]])
def test_default_layers_source_every_depth(stages):
    sizes = parse_stages(stages)
    n_layers, n_stages = sum(sizes), len(sizes)
    for depth in range(1, 2 * n_layers + 1):
        src = default_layers_source(stages, depth)
        assert check_layers_source(src, depth, n_stages) == src, depth
        counts = [src.count(s) for s in range(n_stages)]
        if depth >= n_stages:
            assert min(counts) >= 1, (depth, src)  # every stage used
            # proportional: never more than the quota rounded up
            assert all(c <= math.ceil(depth * n / n_layers) for c, n in zip(counts, sizes, strict=True)), (depth, src)
    aux_layout = [s for s, n in enumerate(sizes) for _ in range(n)]
    assert default_layers_source(stages, n_layers) == aux_layout
    assert default_layers_source(stages, 2 * n_layers) == [s for s in aux_layout for _ in range(2)]


def test_default_layers_source_documented_values():
    got = {d: default_layers_source("L16_33433", d) for d in (1, 4, 6, 8, 12)}
    assert got == {1: [2], 4: [0, 2, 3, 4], 6: [0, 1, 2, 2, 3, 4], 8: [0, 0, 1, 1, 2, 2, 3, 4],
                   12: [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]}
    with pytest.raises(ConfigError, match=">= 1"):
        default_layers_source("L16_33433", 0)


# ---- the head -----------------------------------------------------------------------------------

def test_head_copied_only_for_the_same_classes(aux):
    same = expand(aux, 4)
    assert torch.equal(same.head.weight, aux.head.weight) and torch.equal(same.head.bias, aux.head.bias)
    torch.manual_seed(5)
    other = expand(aux, 4, num_classes=7)
    torch.manual_seed(5)
    fresh = create_model("descendant_vit", num_classes=7, in_chans=3, img_size=16, depth=4, embed_dim=48,
                         num_heads=12, patch_size=4)
    assert other.head.weight.shape == (7, 48)
    assert torch.equal(other.head.weight, fresh.head.weight) and torch.equal(other.head.bias, fresh.head.bias)
    assert not torch.equal(other.head.weight, aux.head.weight[:7])
    assert torch.equal(other.blocks[0].attn.qkv.weight, aux.stages[0].attn.qkv.weight)  # the rest still copied


@pytest.mark.parametrize("mode, family, same, copied", [
    ("auto", "imagenet", True, True), ("auto", "digits", True, False), ("auto", "cifar", True, False),
    ("auto", "imagenet", False, False), ("copy", "digits", True, True), ("copy", "imagenet", False, False),
    ("fresh", "imagenet", True, False), ("fresh", "digits", True, False)])
def test_learngene_head_modes(aux, mode, family, same, copied):
    """10: learngene.head: auto is the original's rule (the learngene's head on ImageNet
    only), copy whenever the class counts match, fresh never; expand follows it."""
    from metaensemble.methods.learngene.experiment import copies_head, init_name

    assert copies_head(mode, family, same) is copied
    d = expand(aux, 4, copy_head=copies_head(mode, family, True))
    assert torch.equal(d.head.weight, aux.head.weight) is (copies_head(mode, family, True))
    assert torch.equal(d.blocks[0].attn.qkv.weight, aux.stages[0].attn.qkv.weight)
    assert init_name(4, [0, 2, 3, 4], copied) != init_name(4, [0, 2, 3, 4], not copied)  # another init, another run


def test_learngene_head_is_validated_with_one_clear_error():
    from metaensemble.methods.learngene.experiment import copies_head

    assert load_config("configs/teachers/digits.yaml").learngene.head == "auto"
    with pytest.raises(ConfigError, match=r"^invalid config: learngene.head: Input should be 'auto', 'copy' or "
                                          r"'fresh'$"):
        load_config("configs/teachers/digits.yaml", ["learngene.head=always"])
    with pytest.raises(ConfigError, match="learngene.head='always' is unknown; valid: auto, copy, fresh"):
        copies_head("always", "imagenet", True)


# ---- the original code's checkpoints ------------------------------------------------------------

def write_original(aux: AuxViT, path, model: str = "aux_deit_small_patch16_224") -> None:
    opt = torch.optim.AdamW(aux.parameters(), lr=5e-4)
    aux.train()
    aux(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    opt.zero_grad()
    aux.eval()
    torch.save({"model": to_original_state(aux),
                "args": argparse.Namespace(model=model, lr=5e-4, drop_path=0.0, input_size=16,
                                           teacher_model="levit_384", distillation_alpha=1.0, epochs=150),
                "optimizer": opt.state_dict(), "lr_scheduler": {"base_lrs": [5e-4], "last_epoch": 3},
                "epoch": 3, "scaler": {"scale": 65536.0, "growth_factor": 2.0},
                "model_ema": to_original_state(aux)}, path)


def test_original_checkpoint_loads_with_weights_only(tmp_path, x):
    aux = small_aux(seed=7)
    path = tmp_path / "checkpoint.pth"
    write_original(aux, path)
    obj = read_original(path)
    assert obj["epoch"] == 3 and obj["args"].teacher_model == "levit_384" and "state" in obj["optimizer"]
    assert "blocks.block.attn.qkv.instances.4.weight" in obj["model"] and "pos_embed" in obj["model"]
    # without the Namespace allowance weights_only refuses the file: the allowance is what loads it
    with pytest.raises(pickle.UnpicklingError, match="Namespace"):
        torch.load(path, map_location="cpu", weights_only=True)
    m = load_original(path, "L16_33433", num_heads=12, img_size=16, patch_size=4)
    assert isinstance(m, AuxViT) and m.embed_dim == 48 and m.num_classes == 10 and not m.training
    assert m.me_spec["kwargs"]["stages"] == "L16_33433"
    for k, v in aux.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(m(x), aux(x), rtol=0, atol=0)


def test_original_checkpoint_with_other_shapes_refused(tmp_path):
    path = tmp_path / "checkpoint.pth"
    write_original(small_aux(seed=7), path)
    with pytest.raises(CheckpointError) as e:
        load_original(path, "L16_33433", num_heads=12, img_size=16, patch_size=4, embed_dim=24)
    msg = str(e.value)
    assert "shape mismatch 66" in msg  # every tensor with an embed dimension: all but head.bias
    assert all(f"stages.{s}.{sub}.weight" in msg for s in range(5) for sub in SUBLAYERS)
    assert all(k in msg for k in ("pos_embed: checkpoint (1, 16, 48) vs model (1, 16, 24)", "head.weight", "norm.bias"))
    # five stages in the file, four in the layout
    with pytest.raises(CheckpointError) as e:
        load_original(path, "L16_4444", num_heads=12, img_size=16, patch_size=4)
    msg = str(e.value)
    assert "the file has 5 stages" in msg and "L16_4444 has 4" in msg
    assert "unexpected 12" in msg and all(f"stages.4.{sub}.bias" in msg for sub in SUBLAYERS)
    # four stages in the file, five in the layout
    path4 = tmp_path / "four.pth"
    write_original(small_aux("L16_4444", seed=7), path4)
    with pytest.raises(CheckpointError) as e:
        load_original(path4, "L16_33433", num_heads=12, img_size=16, patch_size=4)
    msg = str(e.value)
    assert "the file has 4 stages" in msg and "missing 12" in msg and "stages.4.mlp.fc1.weight" in msg


def test_original_checkpoint_layout_and_heads_are_checked_against_args_model(tmp_path, x):
    """11: the file's args.model names the layout and the heads (the original's
    aux_deit_small_patch16_224_L16_33433: 12 heads); a caller who asks for another layout
    of the same stage count (which loads without a shape error and computes another
    function) or other heads is refused, naming both; None takes the file's."""
    aux = small_aux(seed=8)
    path = tmp_path / "checkpoint.pth"
    write_original(aux, path, model="aux_deit_small_patch16_224_L16_33433")
    got = load_original(path, img_size=16, patch_size=4)  # layout and heads from args.model
    assert got.stage_sizes == [3, 3, 4, 3, 3] and got.num_heads == 12
    with torch.no_grad():
        torch.testing.assert_close(got(x), aux(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"args.model='aux_deit_small_patch16_224_L16_33433': stage layout "
                                              r"L16_33433 in the file, L16_43333 asked"):
        load_original(path, "L16_43333", num_heads=12, img_size=16, patch_size=4)
    with pytest.raises(CheckpointError, match="12 heads in the file, 4 asked"):
        load_original(path, "L16_33433", num_heads=4, img_size=16, patch_size=4)
    # the silent failure the check prevents: the same tensors under another layout load and differ
    raw = tmp_path / "raw.pth"
    torch.save(to_original_state(aux), raw)  # no args: the caller's layout is trusted
    wrong = load_original(raw, "L16_43333", num_heads=12, img_size=16, patch_size=4)
    with torch.no_grad():
        assert (wrong(x) - aux(x)).abs().max() > 1e-3
    # an _H<n> token names the heads (LeTs-style names)
    heads = tmp_path / "heads.pth"
    write_original(small_aux("L4_22", num_heads=4, seed=9), heads, model="aux_deit_tiny_patch16_224_L4_22_H4")
    assert load_original(heads, img_size=16, patch_size=4).num_heads == 4


def test_original_raw_state_dict_loads_without_a_model_key(tmp_path, x):
    """11: a file that is the state dict itself (no 'model', no 'args'), as the original's
    loader accepts, loads to the same logits; the Namespace allowance stays local to the read."""
    aux = small_aux(seed=10)
    path = tmp_path / "learngene.pth"
    torch.save(to_original_state(aux), path)
    got = load_original(path, "L16_33433", num_heads=12, img_size=16, patch_size=4)
    with torch.no_grad():
        torch.testing.assert_close(got(x), aux(x), rtol=0, atol=0)
    ns = tmp_path / "ns.pth"
    write_original(aux, ns)
    load_original(ns, "L16_33433", num_heads=12, img_size=16, patch_size=4)
    with pytest.raises(pickle.UnpicklingError, match="Namespace"):  # not allowlisted for the process
        torch.load(ns, map_location="cpu", weights_only=True)


def test_original_checkpoint_other_failures(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_original(tmp_path / "none.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read .*: Unsupported operand"):
        load_original(bad)
    odd = tmp_path / "odd.pth"
    torch.save({"model": to_original_state(small_aux()), "args": argparse.Namespace(out=Path("/x"))}, odd)
    with pytest.raises(CheckpointError, match="cannot read .*: Unsupported global: GLOBAL pathlib.PosixPath"):  # only Namespace is allowed
        load_original(odd, img_size=16, patch_size=4)
    nomodel = tmp_path / "nomodel.pth"
    torch.save({"epoch": 3}, nomodel)
    with pytest.raises(CheckpointError, match="no 'model' state dict"):
        load_original(nomodel)


# ---- saved models -------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["aux", "preserving", "deit"])
def test_save_load_round_trip(tmp_path, aux, x, style):
    model = aux if style == "aux" else expand(aux, 6, style=style, num_classes=5).eval()
    save_model(model, tmp_path, dataset="digits")
    back = load(tmp_path)
    assert type(back) is type(model) and back.me_spec == model.me_spec
    if style == "aux":
        assert back.stage_sizes == [3, 3, 4, 3, 3]  # the layout travels with the learngene
    else:
        assert back.style == style and back.depth == 6
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


# ---- the schema ---------------------------------------------------------------------------------

def test_config_section_and_registration():
    cfg = load_config("configs/teachers/digits.yaml")
    assert cfg.learngene.depths == [4, 6, 8] and cfg.learngene.style == "preserving"
    cfg = load_config("configs/teachers/digits.yaml", ["learngene.depths=[12]",
                                                       "learngene.layers_source=[0,0,0,1,1,1,2,2,3,3,4,4]"])
    assert cfg.learngene.layers_source == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(ConfigError, match="exactly one depth"):
        load_config("configs/teachers/digits.yaml", ["learngene.layers_source=[0,1]"])
    with pytest.raises(ConfigError, match="one stage index per descendant block"):
        load_config("configs/teachers/digits.yaml", ["learngene.depths=[3]", "learngene.layers_source=[0,1]"])
    with pytest.raises(ConfigError):
        load_config("configs/teachers/digits.yaml", ["learngene.style=other"])
    # a list per depth (12: the paper's), the others the default spread
    cfg = load_config("configs/teachers/digits.yaml", ["learngene.depths=[6,12]",
                                                       "learngene.layers_source={12: [0,0,0,1,1,1,2,2,3,3,4,4]}"])
    assert cfg.learngene.source_for(12) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4] and cfg.learngene.source_for(6) is None
    with pytest.raises(ConfigError, match=r"depth 9 is not in learngene.depths \[6, 12\]; depth 12: 2 entries"):
        load_config("configs/teachers/digits.yaml", ["learngene.depths=[6,12]",
                                                     "learngene.layers_source={9: [0], 12: [0,1]}"])
    with pytest.raises(ConfigError, match="or a list per depth"):
        load_config("configs/teachers/digits.yaml", ["learngene.depths=[6,12]", "learngene.layers_source=[0,1]"])


def test_package_is_torch_free_and_models_register_on_lookup():
    code = ("import sys; import metaensemble.methods.learngene, metaensemble.methods.learngene.config; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "from metaensemble.models import create_model; "
            "m = create_model('aux_vit', num_classes=3, in_chans=1, img_size=16, embed_dim=24, stages='L2_11'); "
            "print(type(m).__module__, m.patch_size)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["metaensemble.methods.learngene.model", "2"]
