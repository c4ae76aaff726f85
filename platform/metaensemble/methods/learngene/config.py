"""The ``learngene`` section and the ``learngene`` method, declared to the method registry (no torch)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from metaensemble.config import Section


class LearngeneConfig(Section):
    """Learngene via stage-wise weight sharing: the aux-net distilled from a teacher
    (stage 1), and the descendants of several depths initialised from it (stage 2)."""

    teacher: str | None = None
    """Teacher checkpoint for stage 1: a folder, a runs:/ or models:/ URI, or a foreign
    .pth file (then ``teacher_arch`` and ``teacher_kwargs`` say how to build it)."""
    teacher_arch: str | None = None
    """Registered architecture of a foreign teacher file (e.g. levit_384)."""
    teacher_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra builder arguments of a foreign teacher file."""
    learngene: str | None = None
    """The learngene (a saved aux_vit checkpoint: folder or MLflow URI) the descendants start from."""
    depths: list[int] = Field(default_factory=lambda: [4, 6, 8], min_length=1)
    """Descendant depths; each gets the default layers_source for its depth unless
    ``layers_source`` is given."""
    layers_source: list[int] | None = None
    """Stage index of each descendant block (length = the one depth in ``depths``,
    non-decreasing, each < the learngene's stage count); None: spread the stages
    proportionally (``model.default_layers_source``)."""
    style: Literal["preserving", "deit"] = "preserving"
    """Descendant style: ``preserving`` keeps the aux-net's heads, norm placement and eps
    (a descendant of the aux depth and layout reproduces it); ``deit`` is the original's
    timm DeiT style (embed/64 heads, norm after pooling, eps 1e-6; not function-preserving)."""
    alpha: float = Field(1.0, ge=0, le=1)
    """Weight of the KD term; 1 - alpha goes to cross-entropy on the labels (1: labels unused)."""
    temperature: float = Field(1.0, gt=0, le=100)
    """KD temperature T: KL(softmax(t/T) || softmax(s/T)) * T^2."""
    mixup: float = Field(0.0, ge=0)
    """Mixup Beta(alpha, alpha) parameter (0: off)."""
    cutmix: float = Field(0.0, ge=0)
    """CutMix Beta(alpha, alpha) parameter (0: off)."""
    mixup_prob: float = Field(1.0, ge=0, le=1)
    """Probability of applying mixup or cutmix to a batch."""
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    """Label smoothing of the cross-entropy term (used when alpha < 1 and by finetuning)."""
    lr_batch_reference: int | None = Field(512, gt=0)
    """DeiT's rule: the lr is ``optim.lr`` x global batch / this (None: unscaled)."""
    teacher_config: str = "configs/teachers/digits.yaml"
    """With no ``teacher``, jobs/learngene.py takes the first teacher of this recipe's zoo
    (trained first if missing)."""
    finetune_epochs: int = Field(10, ge=1)
    """Descendants: epochs of finetuning (learngene init and random init alike)."""
    finetune_lr: float = Field(5e-5, gt=0)
    """Descendants: AdamW lr before the batch scaling (the paper: 5e-5 for S, 1e-5 for B)."""
    finetune_min_lr: float = Field(1e-6, ge=0)
    finetune_weight_decay: float = Field(0.05, ge=0)

    eval_only: ClassVar[tuple[str, ...]] = ("teacher_config", "learngene", "depths", "layers_source", "style",
                                            "finetune_epochs", "finetune_lr", "finetune_min_lr",
                                            "finetune_weight_decay")

    @model_validator(mode="after")
    def _layers_source(self) -> LearngeneConfig:
        # Range and order need the learngene's stage count: model.check_layers_source checks them.
        if any(d < 1 for d in self.depths):
            raise ValueError(f"learngene.depths must be >= 1, got {self.depths}")
        if self.layers_source is not None:
            if len(self.depths) != 1:
                raise ValueError(f"learngene.layers_source is for one depth; give exactly one depth in "
                                 f"learngene.depths (got {self.depths}), or leave layers_source null")
            if len(self.layers_source) != self.depths[0]:
                raise ValueError(f"learngene.layers_source has {len(self.layers_source)} entries; it needs "
                                 f"one stage index per descendant block, {self.depths[0]} for depth {self.depths[0]}")
        return self


SECTIONS = {"learngene": LearngeneConfig}
METHODS = {"learngene": {"impl": "metaensemble.methods.learngene.method:LearngeneAux", "sections": ("learngene",),
                         "models": ("aux_vit", "descendant_vit"),
                         "models_module": "metaensemble.methods.learngene.model"}}
