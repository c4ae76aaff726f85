"""The ``fusion`` section and the ``fusion`` method, declared to the method registry (no torch).

Every option of OT fusion (Singh & Jaggi 2020) and of cross-layer alignment (CLAFusion,
Nguyen et al. 2023) is a key here. Defaults follow the settings of the original's fusion
scripts (its sh/fuse_*.sh, not its argparse defaults): activation ground metric, exact
EMD, correction, past correction, s = 0.5, 200 activation samples, the balanced shallow
net as anchor, and its alignment defaults (squared width cost, first and last hidden
layer pinned, per pooling chunk / stage). ``sinkhorn_reg`` is relative to each cost's
maximum. docs/fusion.md lists what differs from the original code, and why.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from metaensemble.config import Section


class FusionConfig(Section):
    """Fuse two or more trained networks (same or different depths) into one."""

    models: list[str] = Field(default_factory=list)
    """The parents: checkpoint folders or MLflow URIs (``models:/teacher.digits.mlp/3``,
    ``runs:/<id>/model``). Empty: jobs/fuse.py takes one from each zoo of
    ``parent_configs`` (training it first if missing)."""
    anchor: Literal["deep", "shallow", "first", "last"] = "shallow"
    """The parent whose widths and neuron order the fused network keeps (model 1 of the
    papers): the shallowest (ties: the last of them; the original's: the deep net is
    aligned onto the depth-balanced shallow one, so the fused net has the deep net's depth
    and the shallow net's widths), the deepest (ties: the last), or by position."""

    # ---- OT fusion --------------------------------------------------------------------
    ground_metric: Literal["activation", "weight"] = "activation"
    """Match neurons by their pre-activation outputs on ``act_samples`` training examples,
    or by their (aligned) incoming weights."""
    distance: Literal["euclidean", "sqeuclidean", "cosine"] = "euclidean"
    """Ground distance between two neurons' activation vectors (or weight rows)."""
    solver: Literal["emd", "sinkhorn"] = "emd"
    """Exact optimal transport (``ot.emd``) or entropic (``ot.sinkhorn``)."""
    sinkhorn_reg: float = Field(0.01, gt=0.0)
    """Entropic regularisation of ``solver=sinkhorn``, relative to the cost divided by its
    maximum (so one value suits every layer)."""
    correction: bool = True
    """Divide each column of the map by its mass, so every anchor neuron is a barycentre
    of the other model's neurons; off: the plan as solved (its entries about 1/n, the
    aligned weights shrink by the width), as the original with its flag off."""
    past_correction: bool = True
    """Align each layer's incoming side with the previous layer's map. Off: each layer's
    moved weights keep their unaligned inputs, while the weight ground metric still
    compares the aligned ones (as the original); needs equal input widths."""
    weight: float = Field(0.5, ge=0.0, le=1.0)
    """The anchor's weight s with two parents (the other gets 1 - s); k > 2 parents are
    averaged with 1/k each."""
    act_samples: int = Field(200, ge=2)
    """Training examples whose activations the ground metric (and activation-based
    alignment costs) use; the same examples for every parent."""
    act_seed: int = 0
    """Seed of the choice of those examples: the fusion is deterministic for a fixed seed."""
    bn_samples: int | None = Field(None, ge=1)
    """Training examples the fused network's BatchNorm statistics are recomputed on
    (None: the whole train split)."""

    # ---- cross-layer alignment ---------------------------------------------------------
    cla_cost: Literal["width", "width_abs", "cka", "cca", "wasserstein"] = "width"
    """Cost between a deep and a shallow layer: squared width difference (the original's
    default), absolute width difference, 1 - linear CKA, 1 - mean CCA, or the Wasserstein
    distance between their neuron sets."""
    cla_scope: Literal["stage", "network"] = "stage"
    """``stage``: align each stage on its own (a VGG's pooling chunk, a ResNet's stage; an
    MLP is one stage) with the pins applied in each, as the original; ``network``: one
    alignment over all units (still within stages), the pins at the network's ends."""
    pin_start: int = Field(1, ge=0)
    """How many leading alignment units (an MLP's hidden layers, a VGG's convs, a ResNet's
    residual blocks) of the shallow net map to the deep net's first ones, per stage or
    per network (``cla_scope``). The original's ``start_layer_idx`` counts from the input,
    1-based: its default 2 is ``pin_start: 1`` (the first hidden layer). In a stage of
    one unit the start pin wins over ``pin_end``. A ResNet stage's first block always maps
    to the deep stage's first."""
    pin_end: int = Field(1, ge=0)
    """How many trailing units map to the deep net's last ones (the original's
    ``free_end_layers``, default 1); 0 leaves the end free."""

    # ---- after fusion (the ``fusion`` engine method, and jobs/fuse.py's rows) ---------------
    finetune: Literal["ce", "kd"] = "ce"
    """How the engine trains the fused network: cross-entropy, or distillation from the
    parents (``distill.alpha``, ``distill.temperature``)."""

    # jobs/fuse.py only
    eval_only: ClassVar[tuple[str, ...]] = ("parent_configs", "parent_seed", "experiment", "rows")
    parent_configs: list[str] = Field(default_factory=lambda: [
        "configs/teachers/digits_mlp_deep.yaml", "configs/teachers/digits_mlp_shallow.yaml"])
    """Teacher recipes, one per parent, when ``models`` is empty; a recipe named twice
    gives two parents (seeds ``parent_seed`` and ``parent_seed + 1``)."""
    parent_seed: int = 0
    """Which seed of each recipe's zoo is the parent."""
    experiment: Literal["fusion", "skill_transfer", "transfer"] = "fusion"
    """``fusion``: the paper's table; ``skill_transfer``: parents trained on two label
    splits (``data.label_split`` parts a and b of the first recipe); ``transfer``: the
    deep architecture initialised from the shallow parent, against the same from scratch."""
    rows: list[Literal["finetune", "kd"]] = Field(default_factory=lambda: ["finetune", "kd"])
    """Trained rows of the fusion table besides the one-shot ones."""


SECTIONS = {"fusion": FusionConfig}
METHODS = {"fusion": {"impl": "metaensemble.methods.fusion.method:FusionMethod", "sections": ("fusion", "distill")}}
