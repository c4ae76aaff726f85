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
    layers_source: list[int] | dict[int, list[int]] | None = None
    """Stage index of each descendant block (non-decreasing, each < the learngene's stage
    count): a list for the one depth in ``depths``, or a list per depth (``{12: [0, 0, 0, 1,
    1, 1, 2, 2, 3, 3, 4, 4]}``, each of that length, each key one of ``depths``); a depth
    without one spreads the stages proportionally (``model.default_layers_source``)."""
    head: Literal["auto", "copy", "fresh"] = "auto"
    """The descendants' classifier head: ``copy`` the learngene's whenever the class counts
    match; ``fresh`` (random init) always; ``auto`` is the original code's rule, the copy
    only on ImageNet (the descendants' dataset of the ImageNet family: ``imagefolder`` or
    its parquet shards, with the learngene's class count), else fresh."""
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
    model_ema: bool = False
    """Keep an exponential moving average of the weights, updated after every optimiser
    step (timm's ``ModelEmaV3``), in both stages, as DeiT's default does; it is evaluated
    beside the trained network (metrics ``ema/val_acc``, ...) and kept in its checkpoints,
    while selection, export and registration stay with the network itself, as in DeiT."""
    model_ema_decay: float = Field(0.99996, gt=0, lt=1)
    """The EMA's decay per optimiser step (DeiT's 0.99996)."""

    eval_only: ClassVar[tuple[str, ...]] = ("teacher_config", "learngene", "depths", "layers_source", "style",
                                            "head", "finetune_epochs", "finetune_lr", "finetune_min_lr",
                                            "finetune_weight_decay")
    added_later: ClassVar[tuple[str, ...]] = ("model_ema", "model_ema_decay")
    stage1_only: ClassVar[tuple[str, ...]] = ("teacher", "teacher_arch", "teacher_kwargs", "alpha", "temperature")
    """What the descendants' runs do not read: set to its defaults in their configs, so that
    it does not name them (``experiment.finetune_config``)."""

    def source_for(self, depth: int) -> list[int] | None:
        """The ``layers_source`` given for ``depth`` (None: the default spread)."""
        if isinstance(self.layers_source, dict):
            return self.layers_source.get(depth)
        return self.layers_source

    @model_validator(mode="after")
    def _layers_source(self) -> LearngeneConfig:
        # Range and order need the learngene's stage count: model.check_layers_source checks them.
        if any(d < 1 for d in self.depths):
            raise ValueError(f"learngene.depths must be >= 1, got {self.depths}")
        src = self.layers_source
        if isinstance(src, list):
            if len(self.depths) != 1:
                raise ValueError(f"learngene.layers_source as one list is for one depth; give exactly one depth in "
                                 f"learngene.depths (got {self.depths}), or a list per depth, e.g. "
                                 f"{{{self.depths[-1]}: [...]}}")
            src = {self.depths[0]: src}
        problems = [f"depth {d} is not in learngene.depths {self.depths}" for d in (src or {}) if d not in self.depths]
        problems += [f"depth {d}: {len(s)} entries, it needs one stage index per descendant block ({d})"
                     for d, s in (src or {}).items() if d in self.depths and len(s) != d]
        if problems:
            raise ValueError(f"learngene.layers_source: {'; '.join(problems)}")
        return self


SECTIONS = {"learngene": LearngeneConfig}
METHODS = {"learngene": {"impl": "metaensemble.methods.learngene.method:LearngeneAux", "sections": ("learngene",),
                         "models": ("aux_vit", "descendant_vit"),
                         "models_module": "metaensemble.methods.learngene.model"},
           "learngene_descendant": {"impl": "metaensemble.methods.learngene.method:LearngeneDescendant",
                                    "sections": ("learngene",)}}
