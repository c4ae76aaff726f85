"""The ``distill`` section and the ``kd`` method, declared to the schema (no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from metaensemble.config import Section, register_method, register_section


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
    methods: list[Literal["kd", "latentbe", "tdiv_sdiv"]] = Field(
        default_factory=lambda: ["kd", "latentbe", "tdiv_sdiv"], min_length=1)
    """The students jobs/distill.py trains and compares (``methods=[...]`` on its command line)."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    """Every student is trained once per seed; the table reports mean +- std over them."""


register_section("distill", DistillConfig)
register_method("kd", "metaensemble.methods.distill:EnsembleKD", sections=("distill",))
