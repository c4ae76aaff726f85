"""The ``distill`` section and the ``kd`` method, declared to the schema (no torch)."""

from __future__ import annotations

from pydantic import Field

from metaensemble.config import Section, register_method, register_section


class DistillConfig(Section):
    """Distillation from an ensemble (kd, weightformer): the loss
    alpha * T^2 * KL(mean_k softmax(z_k/T) || softmax(z_s/T)) + (1 - alpha) * CE."""

    teachers: list[str] = Field(default_factory=list)
    """Teacher checkpoints (folders or MLflow URIs such as models:/teacher.digits.convnet/3);
    any registered architecture."""
    alpha: float = Field(1.0, ge=0.0, le=1.0)
    temperature: float = Field(4.0, gt=0.0)


register_section("distill", DistillConfig)
register_method("kd", "metaensemble.methods.kd.method:EnsembleKD", sections=("distill",))
