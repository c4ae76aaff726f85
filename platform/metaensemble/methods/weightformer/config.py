"""The ``meta`` section and the ``weightformer`` method, declared to the schema (no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

import metaensemble.methods.kd.config  # noqa: F401  (the distill section it also reads)
from metaensemble.config import Section, register_method, register_section


class MetaConfig(Section):
    """WeightFormer meta-training: which teachers, how ensembles are drawn, the extra losses."""

    eval_only: ClassVar[tuple[str, ...]] = (
        "zoo_size", "num_val_teachers", "num_test_teachers", "teacher_config", "test_ensembles", "ablations",
        "mlp_hidden", "kd_epochs", "kd_ensembles", "finetune_epochs", "finetune_lr")

    ensemble_size: int = Field(4, ge=2)
    """K, the teachers per ensemble (at most the generator's max_teachers)."""
    train_teachers: list[str] = Field(default_factory=list)
    val_teachers: list[str] = Field(default_factory=list)
    test_teachers: list[str] = Field(default_factory=list)
    """Teacher URIs per side; the meta-train job fills them from the teacher zoo."""
    zoo_size: int = Field(16, ge=2)
    num_val_teachers: int = Field(4, ge=0)
    num_test_teachers: int = Field(4, ge=1)
    teacher_config: str = "configs/teachers/digits.yaml"
    """Recipe the job uses to train zoo teachers the registry lacks."""
    val_ensembles: int = Field(4, ge=1)
    test_ensembles: int = Field(4, ge=1)
    lambda_mask: float = Field(1e-3, ge=0.0)
    lambda_shift: float = Field(0.1, ge=0.0)
    """0 switches shift consistency off (no second view is generated)."""
    ablations: list[Literal["no_mask", "no_shift", "no_cross", "base_mean", "mlp"]] = Field(
        default_factory=lambda: ["no_mask", "no_shift", "no_cross", "base_mean", "mlp"])
    mlp_hidden: int = Field(256, gt=0)
    kd_epochs: int = Field(15, ge=1)
    """Epochs of the KD baselines (on the subset and on the full train split)."""
    kd_ensembles: int = Field(2, ge=0)
    """How many of the test ensembles get KD baselines (each costs two training runs)."""
    finetune_epochs: int = Field(1, ge=0)
    finetune_lr: float = Field(0.01, gt=0.0)


register_section("meta", MetaConfig)
register_method("weightformer", "metaensemble.methods.weightformer.method:WeightFormerMethod",
                sections=("distill", "meta"), models=("weightformer", "mlp_generator"),
                models_module="metaensemble.methods.weightformer.generator")
