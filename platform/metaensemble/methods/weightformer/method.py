"""WeightFormer meta-training as an engine method.

The engine's "model" is the generator; each training step samples an ensemble of K
meta-train teachers (K drawn from ``meta.train_k``) and a minibatch, generates the
student (with consistency on, also from the teachers cyclically shifted and, with
``meta.cutoff``, from a view with a span of tokens cut off), runs it with
``functional_call`` and back-propagates

    alpha * T^2 * KL(p_bar || softmax(z_s / T)) + (1 - alpha) * CE
    + lambda_mask * mean|mask bias| + lambda_shift * mean_v MSE(view 1, view v)

into the generator. With ``meta.align=permutation`` every teacher's hidden units are
first permuted to match the reference (the first meta-train teacher). Validation (and
the engine's final test report) generates a student for each meta-validation
(meta-test) ensemble, recomputes its BatchNorm statistics on ``meta.bn_data`` and
predicts: the metrics are means over those students.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from metaensemble import data
from metaensemble.config import Config
from metaensemble.data import DatasetInfo
from metaensemble.methods.base import Method
from metaensemble.methods.distill import (
    LoadedTeacher,
    ensemble_kd_loss,
    load_teachers,
    teacher_logits,
)
from metaensemble.methods.weightformer.align import align_states
from metaensemble.methods.weightformer.generator import segment_scale
from metaensemble.methods.weightformer.plan import (
    SIDES,
    check_disjoint,
    check_generator,
    check_teachers,
    plan,
)
from metaensemble.methods.weightformer.student import (
    assemble,
    ensemble_input,
    generate_student,
    make_ensembles,
    student_logits,
)
from metaensemble.methods.weightformer.tokens import tokenise
from metaensemble.models import create_model


class TeacherPool:
    """One side's teachers: frozen modules, their state dicts (aligned to ``reference``
    when ``align`` is ``permutation``: the same functions) and their token rows."""

    def __init__(self, loaded: list[LoadedTeacher], layout, align: str = "none",
                 reference: dict[str, torch.Tensor] | None = None) -> None:
        self.uris = [t.uri for t in loaded]
        self.hashes = [t.sha256 for t in loaded]
        self.models = [t.model for t in loaded]
        states = [{k: v.detach().clone() for k, v in t.model.state_dict().items()} for t in loaded]
        self.states = align_states(states, reference if reference is not None else states[0], layout, align)
        self.rows = [tokenise(s, layout) for s in self.states]

    def __len__(self) -> int:
        return len(self.models)


class WeightFormerMethod(Method):
    name = "weightformer"

    @staticmethod
    def prepare_sweep(cfg: Config) -> Config:
        """Before a sweep's trials: the teachers come from the zoo (trained first if
        missing), split by teacher into meta-train / meta-val / meta-test."""
        return plan(cfg).cfg

    def state_dict(self) -> dict[str, Any]:
        """This rank's ensemble sampler, so a resumed run draws the ensembles it would have."""
        return {"sampler": json.dumps(self.rng.bit_generator.state)} if hasattr(self, "rng") else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sampler_state = json.loads(state["sampler"]) if state.get("sampler") else None

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.pools: dict[str, TeacherPool] = {}
        self._bn_loader = None

    # ---- before any work -------------------------------------------------------------
    def validate(self) -> None:
        check_generator(self.cfg)
        check_teachers(self.cfg)

    # ---- on each worker --------------------------------------------------------------
    def build_model(self, info: DatasetInfo) -> nn.Module:
        gen = create_model(self.cfg.model.name, num_classes=info.num_classes, in_chans=info.in_chans,
                           img_size=info.img_size, **self.cfg.model.kwargs)
        self.setup(gen)
        return gen

    def setup(self, gen: nn.Module) -> None:
        """Load the three teacher pools (checking architectures and that no checkpoint is
        on two sides), draw the fixed val/test ensembles, seed this worker's sampler."""
        m = self.cfg.meta
        self.layout, self.student_spec = gen.layout, gen.student_spec
        self.skeleton = create_model(self.student_spec["arch"], **self.student_spec["kwargs"]).train()
        reference = None
        for side in SIDES:  # "train" first: its first teacher is the alignment's reference
            self.pools[side] = TeacherPool(load_teachers(list(getattr(m, f"{side}_teachers")), self.student_spec),
                                           self.layout, m.align, reference)
            reference = self.pools["train"].states[0]
        check_disjoint({s: p.hashes for s, p in self.pools.items()})
        self.ensembles = {
            "val": make_ensembles(len(self.pools["val"]), m.ensemble_size, m.val_ensembles, self.cfg.seed),
            "test": make_ensembles(len(self.pools["test"]), m.ensemble_size, m.test_ensembles, self.cfg.seed + 1),
        }
        self.rng = np.random.default_rng([self.cfg.seed, self.context.rank, 17])
        if getattr(self, "_sampler_state", None):
            self.rng.bit_generator.state = self._sampler_state

    def sample_orders(self) -> tuple[list[list[int]], list[float]]:
        """This step's views: the ensemble (K from ``meta.train_k``, random meta-train
        teachers in random order) and, with consistency on, the same teachers cyclically
        shifted by 1..K-1 and (with ``meta.cutoff``) the first order again with a span of
        tokens cut off. Returns the orders and each view's cutoff fraction."""
        m = self.cfg.meta
        lo, hi = m.train_sizes()
        k = int(self.rng.integers(lo, hi + 1))
        order = self.rng.choice(len(self.pools["train"]), size=k, replace=False).tolist()
        if m.lambda_shift <= 0:
            return [order], [0.0]
        s = int(self.rng.integers(1, k))
        orders, cut = [order, order[s:] + order[:s]], [0.0, 0.0]
        if m.cutoff > 0:
            orders.append(order)
            cut.append(m.cutoff)
        return orders, cut

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The default groups, with the attention-mask bias in its own group at
        ``meta.mask_lr_scale`` times the learning rate (no weight decay: it has its L1),
        and the mix scorer in its own at ``meta.mix_lr_scale``."""
        from metaensemble.methods.base import without

        groups = super().param_groups(model)
        own = []
        mask = getattr(model, "mask_bias", None)
        if mask is not None:
            own.append({"params": [mask], "weight_decay": 0.0, "lr_scale": self.cfg.meta.mask_lr_scale})
        scorer = getattr(model, "mix_score", None)
        if scorer is not None:
            own.append({"params": list(scorer.parameters()), "weight_decay": 0.0,
                        "lr_scale": self.cfg.meta.mix_lr_scale})
        if not own:
            return groups
        return [*without(groups, [p for g in own for p in g["params"]]), *own]

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch["x"], batch["y"]
        pool, d, m = self.pools["train"], self.cfg.distill, self.cfg.meta
        if self.skeleton_device() != x.device:
            self.skeleton = self.skeleton.to(x.device)
            pool.models = [t.to(x.device) for t in pool.models]
        orders, cut = self.sample_orders()
        xs = ensemble_input(pool.rows, orders, device=x.device)
        out = model(xs, cutoff=cut if any(cut) else None)
        t_logits = teacher_logits([pool.models[i] for i in orders[0]], x)
        anchor = {k: v.to(x.device) for k, v in pool.states[orders[0][0]].items()}
        kd, logits0 = 0.0, None
        for v in range(len(orders)):
            z = student_logits(self.skeleton, assemble(out["rows"], self.layout, anchor, v), x)
            kd = kd + ensemble_kd_loss(z, t_logits, y, d.alpha, d.temperature) / len(orders)
            logits0 = z if logits0 is None else logits0
        loss = kd + m.lambda_mask * out["mask_l1"]
        shift = torch.zeros((), device=x.device)
        if len(orders) > 1:
            shift = shift_consistency(out["rows"], xs, self.layout)
            loss = loss + m.lambda_shift * shift
        return loss, {"loss": loss.detach(), "correct": (logits0.argmax(1) == y).sum(), "kd": kd.detach(),
                      "shift": shift.detach(), "mask_l1": out["mask_l1"].detach()}

    def skeleton_device(self) -> torch.device:
        return next(self.skeleton.parameters()).device

    # ---- evaluation ------------------------------------------------------------------
    def bn_loader(self, device):
        """Where generated students' BN statistics are recomputed (``meta.bn_data``: the
        train split or the meta-training subset), unaugmented."""
        if self._bn_loader is None or self._bn_loader.device != torch.device(device):
            dcfg = self.cfg.data
            if self.cfg.meta.bn_data == "train":
                dcfg = dcfg.model_copy(update={"train_fraction": 1.0})
            splits = data.load(dcfg)
            self._bn_loader = make_eval_loader(splits.train, splits.info, self.cfg.data.eval_batch_size, device)
        return self._bn_loader

    @torch.no_grad()
    def predict(self, model: nn.Module, loader, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions of the students generated for every ``split`` ensemble (val: the
        meta-validation ensembles, test: the meta-test ensembles), concatenated."""
        pool = self.pools[split]
        dev = next(model.parameters()).device
        logps, ys = [], []
        for order in self.ensembles[split]:
            student, _ = generate_student(model, pool.rows, pool.states, order, self.bn_loader(dev))
            lp, yy = super().predict(student, loader)
            logps.append(lp)
            ys.append(yy)
        return torch.cat(logps), torch.cat(ys)

    @torch.no_grad()
    def epoch_metrics(self, model: nn.Module) -> dict[str, float]:
        """Does what the generator learned transfer? After every epoch, students generated
        for ``meta.val_ensembles`` fixed ensembles of meta-train teachers (``seen``) and
        for the meta-val ensembles (``unseen``), BN recomputed as in validation, scored on
        the meta-training subset's images (``subset``, unaugmented) and on the val split
        (``val``): the training objective (``kd``: against their own ensemble's
        predictions) and accuracy. ``seen_subset`` is what meta-training fits;
        ``unseen_val`` is what a user gets."""
        dev = next(model.parameters()).device
        m, d = self.cfg.meta, self.cfg.distill
        if not hasattr(self, "_diag"):
            splits = data.load(self.cfg.data)
            bs = self.cfg.data.eval_batch_size
            self._diag = {
                "loaders": {"subset": make_eval_loader(splits.train, splits.info, bs, dev),
                            "val": make_eval_loader(splits.val, splits.info, bs, dev)},
                "seen": make_ensembles(len(self.pools["train"]), m.ensemble_size, m.val_ensembles, self.cfg.seed + 2),
            }
        sides = {"seen": (self.pools["train"], self._diag["seen"]), "unseen": (self.pools["val"], self.ensembles["val"])}
        out: dict[str, float] = {}
        for side, (pool, ensembles) in sides.items():
            teachers = [t.to(dev).eval() for t in pool.models]
            sums = {images: [0.0, 0.0, 0] for images in self._diag["loaders"]}
            for order in ensembles:
                student, _ = generate_student(model, pool.rows, pool.states, order, self.bn_loader(dev))
                for images, loader in self._diag["loaders"].items():
                    for batch in loader:
                        x, y = batch["x"].to(dev), batch["y"].to(dev)
                        z = student(x)
                        t = teacher_logits([teachers[i] for i in order], x)
                        tot = sums[images]  # [KD loss x images, correct, images]
                        tot[0] += float(ensemble_kd_loss(z, t, y, d.alpha, d.temperature)) * len(y)
                        tot[1] += float((z.argmax(1) == y).sum())
                        tot[2] += len(y)
            for images, (kd, correct, n) in sums.items():
                out[f"{side}_{images}_kd"] = kd / max(n, 1)
                out[f"{side}_{images}_acc"] = correct / max(n, 1)
        return out


def shift_consistency(rows: list[torch.Tensor], xs: list[torch.Tensor], layout) -> torch.Tensor:
    """Mean over layers and over views 2..V of the MSE between view 1's generated rows
    and view v's, in units of each segment's RMS (so weights and BN statistics count alike)."""
    from metaensemble.methods.weightformer.tokens import segment_ids

    terms = []
    for r, x, layer in zip(rows, xs, layout.layers, strict=True):
        seg = segment_ids(layer).to(x.device)
        scale = segment_scale(x[:1], seg, len(layer.segments))[0]
        terms += [F.mse_loss(r[0] / scale, r[v] / scale) for v in range(1, r.shape[0])]
    return torch.stack(terms).mean()


make_eval_loader = data.eval_loader  # the name weightformer's callers know
