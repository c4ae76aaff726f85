"""The ``distill`` section and the ``kd`` method, declared to the method registry (no torch).

The section is read by every method that distils (their declarations name it)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from metaensemble.config import Section


class DistillConfig(Section):
    """Distillation from an ensemble (kd, weightformer): the loss
    alpha * T^2 * KL(mean_k softmax(z_k/T) || softmax(z_s/T)) + (1 - alpha) * CE."""

    teachers: list[str] = Field(default_factory=list)
    """Teacher checkpoints (folders or MLflow URIs such as models:/teacher.digits.convnet/3);
    any registered architecture."""
    alpha: float = Field(1.0, ge=0.0, le=1.0)
    temperature: float = Field(4.0, gt=0.0, le=100.0)

    # jobs/distill.py only: which teachers, students and seeds the experiment trains
    eval_only: ClassVar[tuple[str, ...]] = ("teacher_config", "methods", "seeds")
    teacher_config: str = "configs/teachers/digits_narrow.yaml"
    """The teacher recipe whose zoo jobs/distill.py takes its teachers from (trained
    first if missing) when ``teachers`` is empty; it must train the student's
    architecture on the student's data split."""
    methods: list[str] | None = Field(None, min_length=1)
    """The students jobs/distill.py trains and compares (``methods=[...]`` on its command
    line); the job checks the names. None: every student it knows."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    """Every student is trained once per seed; the table reports mean +- std over them."""


SECTIONS = {"distill": DistillConfig}
METHODS = {"kd": {"impl": "metaensemble.methods.distill:EnsembleKD", "sections": ("distill",)}}
