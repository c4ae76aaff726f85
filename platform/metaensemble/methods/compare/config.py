"""The ``compare`` section of jobs/compare.py, the leaderboard (no torch, no engine method;
the pipeline is ``metaensemble.leaderboard``).

The leaderboard reads the WeightFormer job's config (its zoo, its split of the zoo into
meta-train / meta-val / meta-test teachers, its generator) and adds this section: which
ways of making one network it puts side by side, on how many held-out ensembles."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from metaensemble.config import Section

ROWS = {
    "best_member": ("best_member",),
    "uniform_soup": ("uniform_soup",),
    "greedy_soup": ("greedy_soup",),
    "learned_soup": ("learned_soup",),
    "fusion": ("fusion", "fusion_ft"),
    "kd": ("kd",),
    "latentbe": ("latentbe",),
    "tdiv_sdiv": ("tdiv_sdiv",),
    "weightformer": ("weightformer", "weightformer_ft"),
}
"""Each method jobs/compare.py knows and the leaderboard rows it adds (the ensemble
itself is always the reference row)."""


class CompareConfig(Section):
    """jobs/compare.py: every way the platform makes one network from K, on one zoo."""

    eval_only: ClassVar[tuple[str, ...]] = ("methods", "ensembles", "distill_epochs")
    methods: list[str] | None = Field(None, min_length=1)
    """Which methods (``methods=[...]`` on the command line); None: every one of ``ROWS``."""
    ensembles: int = Field(10, ge=2, le=1000)
    """How many held-out ensembles of K = ``meta.ensemble_size`` teachers, drawn from the
    meta-test teachers (no generator saw them) exactly as the WeightFormer job draws its
    own: its first ``ensembles`` ensembles."""
    distill_epochs: int | None = Field(None, ge=1)
    """Epochs of KD, LatentBE and TDiv-SDiv (one budget for all three); None:
    ``meta.kd_epochs``, the WeightFormer job's KD baseline."""


SECTIONS = {"compare": CompareConfig}
