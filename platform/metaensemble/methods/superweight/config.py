"""The ``superweight`` section and method, declared to the method registry (no torch).

SuperWeight ensembles (Teterwak et al., WACV 2024): Wide ResNet members of different
depths and widths whose every conv weight is composed from template banks shared under
one parameter budget; which layers share is learned from gradient similarity. The keys
follow the seed's flags: ``depths``/``widths`` are ``--depth``/``--wide`` followed by
``--student_depths``/``--student_widths``, ``max_params`` is ``--max_params``,
``split_epochs`` is ``--group_split_epochs`` and so on.
"""

from __future__ import annotations

import itertools
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from metaensemble.config import Section


class SuperWeightConfig(Section):
    """The members, the budget and the learned sharing of a SuperWeight ensemble."""

    depths: list[int] = Field(default_factory=lambda: [16, 16, 10, 10])
    """Member depths (WRN: 6n + 4), the first the deepest; non-increasing."""
    widths: list[float] = Field(default_factory=lambda: [2.0, 1.0, 2.0, 1.0])
    """Member widen factors, one per depth entry; strictly decreasing within one depth.
    A fractional factor widens stages to round(16k), round(32k), round(64k) channels."""
    max_params: int = Field(60_000, ge=1)
    """Budget of the template banks (elements). Coefficients, BatchNorm and classifiers
    are counted on top and reported with them."""
    templates: int = Field(8, ge=1, le=8)
    """Most templates a bank holds; each bank holds K = min(templates, max_params //
    (elements of one template of every bank)) templates."""
    min_templates: int = Field(2, ge=1, le=8)
    """A learned split is accepted only if every bank still holds this many templates
    (the budget "fits"); otherwise the threshold is lowered."""
    param_group_bins: int = Field(4, ge=1)
    """Initial groups: the 3x3 convs (stem included) in this many contiguous bins by
    relative depth, the 1x1 shortcuts in one group of their own."""
    split_epochs: int = Field(20, ge=0)
    """Search-phase epochs (0: no search, the bins are the groups)."""
    split_threshold: float = Field(0.1, ge=-1.0, le=1.0)
    """Gradient cosine above which two layers of one bin stay in one group (start)."""
    split_step: float = Field(0.05, gt=0.0)
    """How much the threshold is lowered each time the budget does not fit."""
    split_floor: float = Field(-1.0, ge=-1.0, le=1.0)
    """The threshold is never lowered below this; if no threshold down to it fits, the
    bins stay the groups."""
    unshare_epochs: int = Field(10, ge=0)
    """Epochs after the split at which shared coefficients are unshared (0: never)."""
    unshare_threshold: float = Field(0.9, ge=-1.0, le=1.0)
    """Layers sharing coefficients whose coefficient gradients have cosine at or below
    this get their own copies."""
    bn_momentum: float = Field(0.1, gt=0.0, le=1.0)

    # jobs/superweight.py only
    eval_only: ClassVar[tuple[str, ...]] = ("comparisons",)
    comparisons: list[Literal["independent", "scaled"]] = Field(
        default_factory=lambda: ["independent", "scaled"])
    """What jobs/superweight.py trains beside the SuperWeight ensemble: an independent
    ensemble of the same architectures, and one scaled to the same parameter count."""

    @model_validator(mode="after")
    def _members(self) -> SuperWeightConfig:
        d, w = self.depths, self.widths
        if len(d) != len(w):
            raise ValueError(f"superweight.depths has {len(d)} entries and superweight.widths {len(w)}: give one "
                             f"width per member")
        if len(d) < 2:
            raise ValueError(f"a SuperWeight ensemble needs at least 2 members; got depths {d}")
        bad = [x for x in d if x < 10 or (x - 4) % 6]
        if bad:
            raise ValueError(f"superweight.depths {bad} cannot be built: a WRN's depth is 6n + 4 with n >= 1 "
                             f"(10, 16, 22, 28, 40, ...)")
        if any(round(16 * x) < 1 for x in w):
            raise ValueError(f"superweight.widths must give every stage a channel (16 x width >= 0.5); got {w}")
        if w[0] != max(w):
            raise ValueError(f"superweight.widths: the first member is the deepest and widest (the search trains it "
                             f"and splits its layers); got widths {w}")
        if any(a < b for a, b in itertools.pairwise(d)):
            raise ValueError(f"superweight.depths must be in decreasing order (the first is the deepest, as the "
                             f"seed's --depth then --student_depths); got {d}")
        for i in range(1, len(d)):
            if d[i] == d[i - 1] and w[i] >= w[i - 1]:
                raise ValueError(f"superweight.widths must be strictly decreasing within one depth; members "
                                 f"{i - 1} and {i} are depth {d[i]} with widths {w[i - 1]}, {w[i]}")
        if self.min_templates > self.templates:
            raise ValueError(f"superweight.min_templates={self.min_templates} exceeds templates={self.templates}")
        if self.split_floor > self.split_threshold:
            raise ValueError(f"superweight.split_floor={self.split_floor} is above split_threshold="
                             f"{self.split_threshold}")
        return self

    @property
    def members(self) -> list[tuple[int, float]]:
        return list(zip(self.depths, self.widths, strict=True))


SECTIONS = {"superweight": SuperWeightConfig}
METHODS = {"superweight": {"impl": "metaensemble.methods.superweight.method:SuperWeight",
                           "sections": ("superweight",), "models": ("superweight",),
                           "models_module": "metaensemble.methods.superweight.model"}}
