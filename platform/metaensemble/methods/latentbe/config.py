"""The ``latentbe`` section and the ``latentbe`` / ``tdiv_sdiv`` methods (no torch)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from metaensemble.config import Section


class LatentBEConfig(Section):
    """The BatchEnsemble student of LatentBE and TDiv-SDiv."""

    members: int | None = Field(None, ge=2)
    """Student members M; member m is distilled from teacher m, so ``distill.teachers``
    needs at least M (the first M are used). None: one member per teacher."""
    perturb_scale: float = Field(1.0, gt=0.0, le=16.0)
    """TDiv-SDiv's step length in units of the paper's sqrt(D)/255 per example (D = pixels
    x channels); 1 is the paper's. Read by ``tdiv_sdiv`` only."""
    fold: Literal["mean_factors", "exact"] = "mean_factors"
    """The plain network that is evaluated, selected and registered: ``mean_factors`` (the
    paper's) folds the members' mean r and s into W, W * r_bar[in] * s_bar[out];
    ``exact`` gives each layer the mean of the members' own weights, W * mean_m(s_m r_m^T).
    The other fold is evaluated beside it (metrics ``fold_<other>/val_acc``, ...), and the
    distill job logs the gap between the two (``fold_gap/test_acc``: other minus selected)."""

    added_later: ClassVar[tuple[str, ...]] = ("fold",)


SECTIONS = {"latentbe": LatentBEConfig}
METHODS = {
    "latentbe": {"impl": "metaensemble.methods.latentbe.method:LatentBE", "sections": ("distill", "latentbe")},
    "tdiv_sdiv": {"impl": "metaensemble.methods.latentbe.method:TDivSDiv", "sections": ("distill", "latentbe")},
}
