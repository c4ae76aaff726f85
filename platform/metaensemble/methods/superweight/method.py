"""SuperWeight ensembles as an engine method (``method: superweight``).

1. Search (``split_epochs`` epochs): the deepest-widest member and the first member of
   every other depth, every conv composed from its depth bin's banks with one
   coefficient vector per (group, tier). In the last search epoch every conv's weight
   gradient is summed over all its steps (``sharing.Recorder``; over every DDP rank).
2. Split (the engine's rebuild point after ``split_epochs``): groups and coefficient
   slots learned from those gradients (``sharing.learn_sharing``; a conv of another
   depth shares the slot of its most similar conv of the largest member), then every
   member rebuilt from scratch with them; K templates per bank from the budget.
3. Unsharing (rebuild point ``unshare_epochs`` later): coefficient gradients recorded per
   conv over the epoch before; slots whose users disagree are cloned, every clone its
   own trainable parameter (the new optimiser sees it), outputs unchanged; every other
   parameter keeps its optimiser state (``carried_parameters``).

The phase, the sharing map and K are the method's state, saved in every checkpoint, so
a worker killed after the split or after unsharing resumes with the same map; the map
is also a constructor argument of the ``superweight`` model, so model.json carries it.

Loss: the members' cross-entropies summed on the same batch (``train.label_smoothing``
applies to each; ``train.grad_clip`` clips the joint gradient, banks being shared).
Predictions: the ensemble (mean of member softmaxes, selected on) and every member,
named ``member/<i>``. Model selection restarts at every rebuild (the engine's rule), so
the selected epoch is one after unsharing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from metaensemble import metrics
from metaensemble.data import DatasetInfo
from metaensemble.errors import ConfigError
from metaensemble.methods.base import Method, without
from metaensemble.methods.superweight.model import (
    SuperWeightEnsemble,
    bins_sharing,
    initial_sharing,
    template_elements,
    templates_for,
    wrn_convs,
)
from metaensemble.methods.superweight.sharing import (
    Recorder,
    learn_sharing,
    search_members,
    unshare,
)


def check_budget(cfg) -> int:
    """K for the whole ensemble on its initial bins; a clear error when the budget cannot
    give every bank even one template."""
    sw, in_chans = cfg.superweight, _in_chans(cfg)
    for d, w in sw.members:
        three = sum(c.k == 3 for c in wrn_convs(d, w, in_chans))
        if sw.param_group_bins > three:
            raise ConfigError(f"superweight.param_group_bins={sw.param_group_bins} but WRN-{d}-{w:g} has only "
                              f"{three} 3x3 convs; use at most {three} bins")
    need = template_elements(sw.members, in_chans, initial_sharing(sw.members, in_chans, sw.param_group_bins))
    if sw.max_params < need:
        raise ConfigError(f"superweight.max_params={sw.max_params} is too small for even one template per bank: "
                          f"the {sw.param_group_bins} depth bins and the 1x1 group of members "
                          f"{_names(sw.members)} need {need} elements per template; give at least {need}")
    return templates_for(sw.max_params, need, sw.templates)


def _names(members) -> str:
    return ", ".join(f"WRN-{d}-{w:g}" for d, w in members)


def _in_chans(cfg) -> int:
    """Input channels of ``cfg.data`` (the stem's fan-in) without loading the images:
    parquet shards say it in their metadata, image folders and CIFAR are RGB."""
    d = cfg.data
    if d.name == "parquet":
        from metaensemble.data.parquet import read_meta

        return int(read_meta(d)["info"].in_chans)
    return {"digits": 1, "synthetic": d.channels}.get(d.name, 3)


class SuperWeight(Method):
    """Members of different depths and widths under one bank budget (module docstring)."""

    name = "superweight"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        sw = cfg.superweight
        self.phase = "search" if sw.split_epochs > 0 else "shared"
        self.sharing: dict[str, Any] | None = None
        self.templates: int | None = None
        self.split: dict[str, Any] = {}
        self.epochs_done = 0
        self.recorder: Recorder | None = None
        self.info: DatasetInfo | None = None

    # ---- before any work -------------------------------------------------------------------
    def validate(self) -> None:
        sw, epochs = self.cfg.superweight, self.cfg.train.epochs
        if self.cfg.model.name != "superweight" or self.cfg.model.kwargs:
            raise ConfigError(f"method superweight builds its members from the superweight section: set model.name="
                              f"superweight with no model.kwargs (got {self.cfg.model.name!r} {self.cfg.model.kwargs})")
        if sw.split_epochs >= epochs:
            raise ConfigError(f"superweight.split_epochs={sw.split_epochs} must be below train.epochs={epochs}: the "
                              f"members are rebuilt with the learned groups after the search and trained after it")
        late = [m for m in self.cfg.optim.decay_milestones if m >= epochs - sw.split_epochs]
        if self.cfg.optim.schedule == "multistep" and late:
            raise ConfigError(f"optim.decay_milestones {late} fall after the run: after the split the schedule "
                              f"restarts over train.epochs - split_epochs = {epochs - sw.split_epochs} epochs and its "
                              f"milestones count from there")
        if sw.unshare_epochs and sw.split_epochs + sw.unshare_epochs >= epochs:
            raise ConfigError(f"superweight.split_epochs + unshare_epochs = {sw.split_epochs + sw.unshare_epochs} "
                              f"must be below train.epochs={epochs} (unsharing happens then), or set "
                              f"unshare_epochs=0")
        check_budget(self.cfg)

    # ---- the model ------------------------------------------------------------------------
    def members_now(self) -> list[tuple[int, float]]:
        sw = self.cfg.superweight
        if self.phase == "search":
            return [sw.members[i] for i in search_members(sw.members)]
        return sw.members

    def build_model(self, info: DatasetInfo) -> nn.Module:
        from metaensemble.models import create_model

        self.info = info
        sw, members = self.cfg.superweight, self.members_now()
        if self.phase == "search":
            sharing = initial_sharing(members, info.in_chans, sw.param_group_bins)
        elif self.sharing is None:  # no search: the bins are the groups, one slot per depth and conv
            self.sharing = sharing = bins_sharing(members, info.in_chans, sw.param_group_bins)
        else:
            sharing = self.sharing
        k = self.templates if self.phase != "search" and self.templates else templates_for(
            sw.max_params, template_elements(members, info.in_chans, sharing), sw.templates)
        if self.phase != "search":
            self.templates = k
            sharing = {**sharing, "learned": self.split}  # what the split found, into model.json
        return create_model("superweight", num_classes=info.num_classes, in_chans=info.in_chans,
                            img_size=info.img_size, members=[list(m) for m in members], sharing=sharing,
                            templates=k, bins=sw.param_group_bins, bn_momentum=sw.bn_momentum)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The default groups (banks, BatchNorms, classifiers) without the coefficients,
        which get no weight decay."""
        coefs = list(model.coefs)
        return [*without(super().param_groups(model), coefs), {"params": coefs, "weight_decay": 0.0}]

    def configure_optimizer(self, model: nn.Module, steps_per_epoch: int):
        """The search phase at the base lr (constant, after any warm-up); after the split,
        ``cfg.optim``'s schedule restarts and runs over the ``train.epochs -
        split_epochs`` epochs left (its milestones count from the split), as the seed's
        epoch counter restarts for the rebuilt ensemble (unsharing at its epoch 10)."""
        from metaensemble.engine.optim import build_optimizer, build_scheduler

        o, sw = self.cfg.optim, self.cfg.superweight
        optimizer = build_optimizer(o, self.param_groups(model))
        if self.phase == "search":
            return optimizer, build_scheduler(optimizer, o.model_copy(update={"schedule": "constant"}),
                                              steps_per_epoch, sw.split_epochs)
        return optimizer, build_scheduler(optimizer, o, steps_per_epoch, self.cfg.train.epochs - sw.split_epochs,
                                          offset=sw.split_epochs * steps_per_epoch)

    # ---- training ---------------------------------------------------------------------------
    def _recording(self) -> Recorder | None:
        sw, epoch = self.cfg.superweight, self.epochs_done + 1  # the epoch now running, 1-based
        want = None
        if self.phase == "search" and epoch == sw.split_epochs:
            want = "weights"
        elif self.phase == "shared" and sw.unshare_epochs and epoch == sw.split_epochs + sw.unshare_epochs:
            want = "coefs"
        if want is None:
            return None
        if self.recorder is None:
            self.recorder = Recorder(weights=want == "weights", coefs=want == "coefs")
        return self.recorder

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        from metaensemble.models import unwrap

        base = unwrap(model)
        base.recorder = self._recording()
        logits = model(batch["x"])  # [M, B, C]
        y = batch["y"]
        m = logits.shape[0]
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.repeat(m), reduction="sum",
                               label_smoothing=self.cfg.train.label_smoothing) / y.shape[0]
        probs = F.softmax(logits.detach().float(), -1).mean(0)
        return loss, {"loss": loss.detach(), "correct": (probs.argmax(1) == y).sum()}

    def rebuild(self, model: nn.Module, epoch: int) -> nn.Module | None:
        sw = self.cfg.superweight
        self.epochs_done = epoch  # which epoch's gradients the next one records (``_recording``)
        model.recorder = None
        if self.phase == "search" and epoch == sw.split_epochs:
            return self._split(model)
        if self.phase == "shared" and sw.unshare_epochs and epoch == sw.split_epochs + sw.unshare_epochs:
            return self._unshare(model)
        return None

    def _split(self, model: SuperWeightEnsemble) -> nn.Module:
        sw, info = self.cfg.superweight, self.info
        rec = self.recorder.reduced(self.context.all_reduce) if self.recorder is not None else {}
        self.recorder = None
        searched = search_members(sw.members)
        grads = {s: [rec[(j, i)] for i in range(len(model.members[j].convs))] for j, s in enumerate(searched)}
        found = learn_sharing(sw.members, info.in_chans, grads, bins=sw.param_group_bins, max_params=sw.max_params,
                              templates=sw.templates, min_templates=sw.min_templates, start=sw.split_threshold,
                              step=sw.split_step, floor=sw.split_floor)
        self.phase, self.sharing, self.templates = "shared", found.sharing, found.templates
        self.split = {"threshold": found.threshold, "tried": found.tried,
                      "groups": len({g for row in found.sharing["groups"] for g in row})}
        return self.build_model(info)  # every member from scratch, with the learned groups

    def _unshare(self, model: SuperWeightEnsemble) -> nn.Module | None:
        sw = self.cfg.superweight
        rec = self.recorder.reduced(self.context.all_reduce) if self.recorder is not None else {}
        self.recorder = None
        new, clones = unshare(self.sharing, rec, sw.unshare_threshold)
        self.phase = "unshared"
        self.split["clones"] = len(clones)
        if not clones:
            return None
        self.sharing = new
        rebuilt = self.build_model(self.info)
        clone_values(model, rebuilt, clones)
        return rebuilt

    def carried_parameters(self, old: nn.Module, new: nn.Module) -> dict[nn.Parameter, nn.Parameter]:
        """At the split nothing carries (every member is rebuilt from scratch, as the
        original does with a new optimiser). At unsharing every parameter continues the
        one of its name (a slot that lost its widest user its leading tiers); the clones
        start with no optimiser state, as the original's new parameter group."""
        if self.phase != "unshared":
            return {}
        olds = dict(old.named_parameters())
        return {p: olds[k] for k, p in new.named_parameters() if k in olds}

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "sharing": self.sharing, "templates": self.templates,
                "epochs_done": self.epochs_done, "split": self.split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.phase, self.sharing, self.templates = state["phase"], state["sharing"], state["templates"]
        self.epochs_done, self.split = state["epochs_done"], state.get("split", {})

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model: nn.Module, loader, split: str = "val"):
        model.eval()
        outs, ys = [], []
        for batch in loader:
            outs.append(model(batch["x"]).float().cpu())
            ys.append(batch["y"].cpu())
        z = torch.cat(outs, 1) if outs else torch.empty(len(model.members), 0, 0)
        y = torch.cat(ys) if ys else torch.empty(0, dtype=torch.long)
        named = {"ensemble": metrics.ensemble_logp(z)}
        named.update({f"member/{m}": F.log_softmax(z[m], -1) for m in range(z.shape[0])})
        return named, y


def clone_values(old: SuperWeightEnsemble, new: SuperWeightEnsemble, clones: dict[int, int]) -> None:
    """Copy ``old`` into ``new`` (same groups, more slots): banks and members as they are,
    each slot its own values, each clone its source slot's (the tiers it needs)."""
    state = {k: v for k, v in old.state_dict().items() if not k.startswith("coefs.")}
    with torch.no_grad():
        for s, p in enumerate(new.coefs):
            src = old.coefs[clones.get(s, s)]
            p.copy_(src[: p.shape[0]])
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("coefs.") for k in missing):
        raise RuntimeError(f"unsharing changed more than the coefficients: missing {missing}, unexpected {unexpected}")
