"""The ``meta`` section and the ``weightformer`` method, declared to the method registry (no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from metaensemble.config import Section


class MetaConfig(Section):
    """WeightFormer meta-training: which teachers, how ensembles are drawn, the extra losses."""

    eval_only: ClassVar[tuple[str, ...]] = (
        "zoo_size", "num_val_teachers", "num_test_teachers", "teacher_config", "test_ensembles", "ablations",
        "mlp_hidden", "kd_epochs", "kd_ensembles", "ceiling_ensembles", "finetune_epochs", "finetune_lr", "report_k", "report_k_ensembles",
        "bootstrap")

    ensemble_size: int = Field(4, ge=2)
    """K, the teachers per ensemble (at most the generator's max_teachers): the held-out
    ensembles' size, and meta-training's unless ``train_k`` says otherwise."""
    train_k: list[int] = Field(default_factory=list)
    """[lo, hi]: each meta-training step draws K uniformly from lo..hi (empty: ensemble_size)."""
    align: Literal["none", "permutation"] = "none"
    """Before tokenising, permute each teacher's hidden units to match a reference (the
    first meta-train teacher) by weight matching; ``none`` leaves them as trained."""
    train_teachers: list[str] = Field(default_factory=list)
    val_teachers: list[str] = Field(default_factory=list)
    test_teachers: list[str] = Field(default_factory=list)
    """Teacher URIs per side; the meta-train job fills them from the teacher zoo."""
    zoo_size: int = Field(16, ge=2)
    num_train_teachers: int = Field(0, ge=0)
    """Meta-train on only the first this many (by seed) of the meta-train teachers the
    split leaves (0: all of them). The val and test teachers stay the same, so runs that
    differ only in this see the same held-out ensembles (benchmarks/meta_ensemble.py
    --teachers)."""
    num_val_teachers: int = Field(4, ge=0)
    num_test_teachers: int = Field(4, ge=1)
    teacher_config: str = "configs/teachers/digits.yaml"
    """Recipe the job uses to train zoo teachers the registry lacks."""
    val_ensembles: int = Field(4, ge=1)
    test_ensembles: int = Field(4, ge=1)
    lambda_mask: float = Field(1e-3, ge=0.0)
    lambda_shift: float = Field(0.1, ge=0.0)
    """Weight of the consistency loss between the ensemble's generation and its shifted
    (teachers' order cyclically shifted) and cutoff views; 0 switches it off (one view)."""
    cutoff: float = Field(0.0, ge=0.0, lt=1.0)
    """With consistency on: a third view in which this fraction of each layer's teacher
    tokens (one contiguous span) has its embedding zeroed; 0: no cutoff view."""
    mask_lr_scale: float = Field(1.0, gt=0.0)
    """The attention-mask bias's learning rate relative to optim.lr."""
    mix_lr_scale: float = Field(1.0, gt=0.0)
    """The mix scorer's learning rate relative to optim.lr (``base=mix``): at 1x and 600
    steps its weights move by under 0.01 and the mix stays within a few percent of uniform."""
    bn_data: Literal["train", "subset"] = "train"
    """Where every evaluated network's BatchNorm statistics are recomputed (no augmentation,
    no momentum: PyTorch's cumulative average over the batches): the whole train split or
    the meta-training subset."""
    ablations: list[Literal["no_mask", "no_shift", "no_cross", "base_mean", "base_anchor", "per_row_mix", "mlp"]] = Field(
        default_factory=lambda: ["no_cross", "base_mean", "base_anchor", "per_row_mix", "mlp"])
    mlp_hidden: int = Field(256, gt=0)
    kd_epochs: int = Field(15, ge=1)
    """Epochs of the KD baselines (on the subset and on the full train split)."""
    kd_ensembles: int = Field(2, ge=0)
    """How many of the test ensembles get KD baselines (each costs two training runs)."""
    ceiling_ensembles: int = Field(0, ge=0)
    """How many of the test ensembles get the two ceilings: the student's parameters fit to
    the ensemble directly from the teachers' average, where the generator starts (KD on the
    full train split for ``kd_epochs`` epochs with the finetuning recipe: SGD from
    ``finetune_lr``, cosine), the generator's output form with the correction KD finds for
    that one ensemble; and KD from scratch (the KD rows' recipe) trained 4 x ``kd_epochs``."""
    finetune_epochs: int = Field(1, ge=0)
    finetune_lr: float = Field(0.01, gt=0.0)
    report_k: list[int] = Field(default_factory=list)
    """Ensemble sizes at which the zero-shot generator is also reported (K at test time
    may differ from training's); each needs at most num_test_teachers."""
    report_k_ensembles: int = Field(10, ge=1)
    bootstrap: int = Field(10000, ge=100)
    """Resamples of the paired bootstrap intervals over held-out ensembles."""

    @model_validator(mode="after")
    def _check(self) -> MetaConfig:
        if self.train_k:
            if len(self.train_k) != 2 or not 2 <= self.train_k[0] <= self.train_k[1]:
                raise ValueError(f"meta.train_k must be [lo, hi] with 2 <= lo <= hi, got {self.train_k}")
        for k in self.report_k:
            if not 2 <= k <= self.num_test_teachers:
                raise ValueError(f"meta.report_k holds {k}; each K must be in 2..num_test_teachers="
                                 f"{self.num_test_teachers}")
        return self

    def train_sizes(self) -> tuple[int, int]:
        """(lo, hi) of meta-training's K."""
        return (self.train_k[0], self.train_k[1]) if self.train_k else (self.ensemble_size, self.ensemble_size)


SECTIONS = {"meta": MetaConfig}
METHODS = {"weightformer": {"impl": "metaensemble.methods.weightformer.method:WeightFormerMethod",
                            "sections": ("distill", "meta"), "models": ("weightformer", "mlp_generator"),
                            "models_module": "metaensemble.methods.weightformer.generator"}}
