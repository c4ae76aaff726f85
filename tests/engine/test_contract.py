"""The method contract, hook by hook, each with the smallest method that needs it, on a
real local Ray instance (2-worker gloo DDP) and a real MLflow server."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from metaensemble import data, engine, metrics, models, tracking
from metaensemble.engine import fit
from metaensemble.methods import Method
from metaensemble.methods.base import RunContext
from metaensemble.models import create_model, unwrap


# ---- small methods, one per hook ---------------------------------------------------------
class Scaled(nn.Module):
    """A network and a learnable logit scale: trained as a pair, exported folded."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.scale = net, nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.net(x) * self.scale


def last_linear(net: nn.Module) -> nn.Linear:
    return [m for m in net.modules() if isinstance(m, nn.Linear)][-1]


class Pair(nn.Module):
    """Two members; forward gives their stacked logits [2, B, C]."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.members = nn.ModuleList([a, b])

    def forward(self, x):
        return torch.stack([m(x) for m in self.members])


class FoldedEnsembleMethod(Method):
    """Trains ``Scaled(convnet)`` pairs; exports one plain convnet pair with the scale
    folded into the classifiers; predicts each member and the ensemble; logs a margin;
    records each rank's draws of the global RNG."""

    def __init__(self, cfg, out_dir) -> None:
        super().__init__(cfg)
        self.out_dir = str(out_dir)

    def build_model(self, info):
        make = super().build_model
        return Pair(Scaled(make(info)), Scaled(make(info)))

    def training_step(self, model, batch):
        x = batch["x"] + 0.01 * torch.randn_like(batch["x"])  # the rank's own noise stream
        if not hasattr(self, "_drawn"):
            self._drawn = True
            save_file({"noise": x - batch["x"]},
                      os.path.join(self.out_dir, f"noise-rank{self.context.rank}.safetensors"))
        logits = model(x)
        loss = sum(F.cross_entropy(z, batch["y"]) for z in logits) / 2
        mean = logits.mean(0)
        top2 = mean.topk(2, dim=1).values
        return loss, {"loss": loss.detach(), "correct": (mean.argmax(1) == batch["y"]).sum(),
                      "margin": (top2[:, 0] - top2[:, 1]).mean().detach()}

    def export(self, model):
        out = []
        for m in model.members:
            net = create_model(m.net.me_spec["arch"], **m.net.me_spec["kwargs"])
            net.load_state_dict(m.net.state_dict())
            lin = last_linear(net)
            with torch.no_grad():
                lin.weight.mul_(m.scale)
                lin.bias.mul_(m.scale)
            out.append(net)
        pair = Pair(*out)
        pair.me_spec = {"arch": "pair", "kwargs": {"num_classes": 10}}
        return pair

    @torch.no_grad()
    def predict(self, model, loader, split="val"):
        model.eval()
        lps, ys = {"ensemble": [], "member/0": [], "member/1": []}, []
        for b in loader:
            logp = [F.log_softmax(z, 1) for z in model(b["x"])]
            lps["member/0"].append(logp[0])
            lps["member/1"].append(logp[1])
            lps["ensemble"].append(metrics.ensemble_logp(torch.stack(logp)))
            ys.append(b["y"])
        return {k: torch.cat(v) for k, v in lps.items()}, torch.cat(ys)

    @torch.no_grad()
    def epoch_metrics(self, model):
        """Counts its calls and says whether it was handed the export (no scale left)."""
        self._calls = getattr(self, "_calls", 0) + 1
        return {"epoch_calls": float(self._calls), "export_scaled": float(any("scale" in k for k in model.state_dict()))}


class GrowingMethod(Method):
    """A convnet that gains a learnable per-class logit bias after epoch 2 (a rebuild);
    the sharing state ``grown`` lives in the method and so in every checkpoint. The step
    draws input noise from the global RNG, so a resume that lost a rank's RNG drifts."""

    def __init__(self, cfg, out_dir=None, sleep: float = 0.0) -> None:
        super().__init__(cfg)
        self.grown, self.out_dir, self.sleep = False, out_dir and str(out_dir), sleep

    def build_model(self, info):
        net = super().build_model(info)
        return self._grow(net, info.num_classes) if self.grown else net

    @staticmethod
    def _grow(net, k):
        class Grown(nn.Module):
            def __init__(self):
                super().__init__()
                self.net, self.bias = net, nn.Parameter(torch.linspace(-0.1, 0.1, k))

            def forward(self, x):
                return self.net(x) + self.bias

        return Grown()

    def training_step(self, model, batch):
        if self.sleep:
            time.sleep(self.sleep)
        x = batch["x"] + 0.05 * torch.randn_like(batch["x"])
        return super().training_step(model, {**batch, "x": x})

    def rebuild(self, model, epoch):
        if self.out_dir and self.context.rank == 0:
            Path(self.out_dir, f"epoch{epoch - 1}-pid{os.getpid()}").touch()
        if epoch == 2 and not self.grown:
            self.grown = True
            return self._grow(model, last_linear(model).out_features)
        return None

    def export(self, model):
        """The bias folded into the classifier: a plain convnet again."""
        if not self.grown:
            return model
        net = create_model(model.net.me_spec["arch"], **model.net.me_spec["kwargs"])
        net.load_state_dict(model.net.state_dict())
        with torch.no_grad():
            last_linear(net).bias.add_(model.bias)
        return net

    def state_dict(self):
        return {"grown": self.grown}

    def load_state_dict(self, state):
        self.grown = bool(state["grown"])


@pytest.fixture(autouse=True, scope="module")
def _pickle_this_module_by_value():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _metric_keys(run_id):
    return set(tracking.client().get_run(run_id).data.metrics)


# ---- export, named predictions, scalars, per-rank RNG, sharded validation, evaluate -------------
def test_export_named_predictions_scalars_rank_rng_and_evaluate(ray_local, digits_cfg, tmp_path):
    cfg = digits_cfg("scaling.num_workers=2", "train.epochs=2")
    out = tmp_path / "rec"
    out.mkdir()
    outcome = fit(cfg, method=FoldedEnsembleMethod(cfg, out))

    # every scalar a step returns reaches MLflow per epoch; each named prediction too
    keys = _metric_keys(outcome.run_id)
    assert {"train_margin", "train_loss", "train_acc"} <= keys
    assert {"val_acc", "member/0/val_acc", "member/1/val_acc", "member/0/val_nll"} <= keys
    assert {"test_acc", "member/0/test_acc", "member/1/test_cnll"} <= keys
    hist = tracking.client().get_metric_history(outcome.run_id, "train_margin")
    assert sorted(m.step for m in hist) == [1, 2]
    # epoch_metrics: once per epoch (rank 0), on the export, logged at the epoch's step
    calls = tracking.client().get_metric_history(outcome.run_id, "epoch_calls")
    assert sorted((m.step, m.value) for m in calls) == [(1, 1.0), (2, 2.0)]
    assert [m.value for m in tracking.client().get_metric_history(outcome.run_id, "export_scaled")] == [0.0, 0.0]
    assert "epoch_metrics_s" in keys  # timed apart from epoch_time_s

    # the saved model is the export (folded: no scale parameter) ...
    d = models.local_dir(outcome.model_uri)
    weights = load_file(str(d / "model.safetensors"))
    assert weights and not any("scale" in k for k in weights)
    # ... and validation covered the whole split, gathered from both ranks: the logged
    # val NLL is the exported model's on every val example, recomputed here in-process
    method = FoldedEnsembleMethod(cfg, out)
    splits = data.load(cfg.data)
    pair = Pair(*(create_model("convnet", num_classes=10, in_chans=1, img_size=8, **cfg.model.kwargs)
                  for _ in range(2)))
    pair.load_state_dict(weights)
    pair.me_spec = {"arch": "pair", "kwargs": {"num_classes": 10}}
    preds, y = method.predict(pair, data.ArrayLoader(splits.val, splits.info, 512))
    assert len(y) == len(splits.val)
    mine = metrics.classification_metrics(preds["ensemble"], y, "val_")
    run = tracking.client().get_run(outcome.run_id)
    best = int(run.data.metrics["best_epoch"])
    logged = {m.step: m.value for m in tracking.client().get_metric_history(outcome.run_id, "val_nll")}
    assert mine["val_nll"] == pytest.approx(logged[best], rel=1e-4)

    # each rank drew its own noise from the global RNG (initial weights stay shared)
    n0, n1 = (load_file(str(out / f"noise-rank{r}.safetensors"))["noise"] for r in (0, 1))
    assert not torch.allclose(n0[:8], n1[:8])

    # engine.evaluate: the same report for a model no training produced, as an MLflow run
    ev = engine.evaluate(pair, cfg, method=method)
    assert ev.metrics["test_acc"] == pytest.approx(outcome.metrics["test_acc"])
    assert ev.metrics["val_nll"] == pytest.approx(outcome.metrics["val_nll"], rel=1e-4)
    assert {"test_cnll", "test_cece", "temperature", "member/0/test_acc"} <= set(ev.metrics)
    r = tracking.client().get_run(ev.run_id)
    assert r.info.status == "FINISHED" and ev.run_id != outcome.run_id
    assert (models.local_dir(f"runs:/{ev.run_id}/model") / "model.safetensors").is_file()
    again = engine.evaluate(pair, cfg, method=method)
    assert again.skipped and again.run_id == ev.run_id


# ---- rebuild + method state + every rank's RNG survive a worker kill -----------------------------
def test_rebuild_at_epoch_2_and_worker_killed_at_epoch_3_resumes_to_the_same_weights(ray_run_dir, worker_killer, ray_local, digits_cfg, tmp_path):
    base = ("scaling.num_workers=2", "train.epochs=4", "scaling.max_failures=2")
    # the uninterrupted reference, in its own Ray storage: the killed run's folder is then
    # the only one under run_dir's root (both runs have one run key)
    ref_cfg = digits_cfg(*base, "experiment=test/rebuild-ref", f"storage_path={tmp_path / 'ref'}")
    ref = fit(ref_cfg, method=GrowingMethod(ref_cfg))
    outcome, killed = _killed_at_epoch_3(ray_run_dir, worker_killer, digits_cfg, tmp_path, base)
    assert killed, "the worker was never killed"
    run = tracking.client().get_run(outcome.run_id)
    assert int(run.data.tags["metaensemble.resumed_from_epoch"]) >= 1

    w_ref = load_file(str(Path(ref.checkpoint_path) / "model.safetensors"))
    w = load_file(str(Path(outcome.checkpoint_path) / "model.safetensors"))
    assert "bias" in w, "the rebuilt parameter was lost on resume"
    assert set(w) == set(w_ref)
    for k in w_ref:
        assert torch.equal(w[k], w_ref[k]), f"{k} differs from the uninterrupted run"


def _killed_at_epoch_3(ray_run_dir, worker_killer, digits_cfg, tmp_path, base):
    """The run whose worker is killed in epoch 3: (its outcome, the pids killed)."""
    cfg = digits_cfg(*base, "experiment=test/rebuild-kill")
    out = tmp_path / "rec"
    out.mkdir()
    run_dir = ray_run_dir(cfg)
    def worker_in_epoch_3():
        recs = list(out.glob("epoch1-pid*"))  # epoch index 1 = the second epoch is done
        if recs and len(list(run_dir.glob("checkpoint_*"))) >= 2:
            return int(recs[0].name.split("pid")[1])
        return None

    killer = worker_killer(worker_in_epoch_3, delay=0.3)
    outcome = fit(cfg, method=GrowingMethod(cfg, out, sleep=0.05))
    return outcome, killer.join()


# ---- optimiser groups and schedules (no Ray) ----------------------------------------------------
def test_param_groups_skip_decay_on_norms_and_biases_and_schedules_follow_timm(digits_cfg):
    cfg = digits_cfg("optim.weight_decay=0.01", "optim.warmup_epochs=1", "optim.schedule=multistep",
                     "optim.decay_milestones=[2]", "train.epochs=3", "optim.lr=0.1")
    net = create_model("convnet", num_classes=10, in_chans=1, img_size=8, width=8)
    opt, sched = Method(cfg).configure_optimizer(net, steps_per_epoch=5)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in net.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), f"{name}: weight decay only on weights"
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[0] < 0.05 and lrs[5] == pytest.approx(0.1)  # warm-up, then the base lr
    assert lrs[5 + 2 * 5] == pytest.approx(0.01)  # decayed at epoch 2 after the warm-up

    everything = Method(cfg.with_overrides(["optim.decay_norm_bias=true"])).configure_optimizer(net, 5)[0]
    assert all(g["weight_decay"] == 0.01 for g in everything.param_groups)


def test_a_rebuild_keeps_the_optimiser_state_of_the_parameters_that_persist(digits_cfg):
    from metaensemble.engine import loop

    class LocalRun(loop.MemberRun):
        def wrap(self, model):  # the engine's wrap without Ray's DDP
            self.model = self.base = model
            self.optimizer, self.scheduler = loop.configure_optimizer(self.method, model, self.cfg, 5)

    cfg = digits_cfg("optim.name=sgd", "optim.momentum=0.9", "train.epochs=4")
    method = GrowingMethod(cfg)
    run = LocalRun({"run_key": "local"}, cfg, method, RunContext(), {}, None, 5, {"global_step": 0})
    torch.manual_seed(0)
    run.wrap(create_model("convnet", num_classes=10, in_chans=1, img_size=8, width=8))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(2):
        run.optimizer.zero_grad()
        F.cross_entropy(run.model(x), y).backward()
        run.optimizer.step()
    before = {p: run.optimizer.state[p]["momentum_buffer"].clone() for p in run.base.parameters()}
    loop.rebuild_point(run, 1, metrics := {})  # after epoch 2: the bias is added
    assert metrics["rebuilt"] == 1 and isinstance(run.base.bias, nn.Parameter)
    for p, buf in before.items():
        assert torch.equal(run.optimizer.state[p]["momentum_buffer"], buf), "a persisting parameter keeps its momentum"
    assert not run.optimizer.state.get(run.base.bias), "a new parameter starts with none"


def test_carried_state_is_cut_to_a_smaller_parameter_and_refused_for_a_larger_one():
    from metaensemble.engine.optim import carry_state

    big, small, other = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(5))
    old = torch.optim.Adam([big, other])
    (big.sum() + other.sum()).backward()
    old.step()
    new = torch.optim.Adam([small])
    assert carry_state(old, new, {small: big, other: other}) == 1, "only parameters of the new optimiser"
    assert torch.equal(new.state[small]["exp_avg"], old.state[big]["exp_avg"][:2])
    assert new.state[small]["step"] == old.state[big]["step"] and new.state[small]["exp_avg"] is not old.state[big]["exp_avg"]
    with pytest.raises(ValueError, match="cannot continue"):
        carry_state(new, torch.optim.Adam([big]), {big: small})  # new holds small's state


def test_a_run_context_sums_over_ranks_only_with_several_and_prepare_sweep_keeps_the_config(digits_cfg):
    t = torch.ones(3)
    assert RunContext().all_reduce(t) is t and torch.equal(t, torch.ones(3)), "one process: unchanged"
    with pytest.raises(ValueError, match="reduce_sum"):
        RunContext(rank=1, world_size=2)
    two = RunContext(rank=1, world_size=2, reduce_sum=lambda x: x.mul_(2))  # as if the other rank held the same
    assert torch.equal(two.all_reduce(torch.ones(2)), torch.full((2,), 2.0))
    cfg = digits_cfg()
    assert Method.prepare_sweep(cfg) is cfg


def test_unwrap_strips_only_ddp_wrappers():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)  # a model's own submodule named "module"

    h = Holder()
    assert unwrap(h) is h


# ---- init_from --------------------------------------------------------------------------------
def test_init_from_loads_weights_and_names_every_mismatched_tensor(tmp_path, digits_cfg):
    from metaensemble.engine.loop import build_initial_model
    from metaensemble.errors import CheckpointError, ConfigError

    src = create_model("convnet", num_classes=10, in_chans=1, img_size=8, width=8)
    models.save_model(src, tmp_path / "src", dataset="digits")
    cfg = digits_cfg(f"model.init_from={tmp_path / 'src'}")
    info = data.load(cfg.data).info
    model = build_initial_model(Method(cfg), info, cfg)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k

    wide = digits_cfg(f"model.init_from={tmp_path / 'src'}", "model.kwargs.width=16")
    with pytest.raises(ConfigError, match="init_from"):
        engine.validate(wide)
    with pytest.raises(CheckpointError) as e:
        build_initial_model(Method(wide), info, wide)
    wide_sd = create_model("convnet", num_classes=10, in_chans=1, img_size=8, width=16).state_dict()
    differ = [k for k, v in src.state_dict().items() if v.shape != wide_sd[k].shape]
    assert len(differ) > 3
    for k in differ:
        assert k in str(e.value), f"{k} not named"


# ---- teachers of any architecture ----------------------------------------------------------------
def test_kd_teachers_of_another_architecture_load_once_frozen(tmp_path, digits_cfg):
    from metaensemble.errors import CheckpointError
    from metaensemble.methods.distill import EnsembleKD

    teacher = create_model("mlp", num_classes=10, in_chans=1, img_size=8)
    models.save_model(teacher, tmp_path / "t", dataset="digits")
    cfg = digits_cfg("method=kd", f"distill.teachers=[{tmp_path / 't'}]")
    info = data.load(cfg.data).info
    kd = EnsembleKD(cfg)
    student = kd.build_model(info)
    assert student.me_spec["arch"] == "convnet"
    ts = kd.teachers("cpu")
    assert ts is kd.teachers("cpu"), "teachers are loaded once per worker"
    assert ts[0].me_spec["arch"] == "mlp" and not ts[0].training
    assert not any(p.requires_grad for p in ts[0].parameters())
    batch = next(iter(data.ArrayLoader(data.load(cfg.data).train, info, 16)))
    loss, logs = kd.training_step(student, batch)
    loss.backward()
    assert all(p.grad is None for p in ts[0].parameters())

    wrong = create_model("mlp", num_classes=3, in_chans=1, img_size=8)
    models.save_model(wrong, tmp_path / "w", dataset="digits")
    bad = digits_cfg("method=kd", f"distill.teachers=[{tmp_path / 'w'}]")
    with pytest.raises(CheckpointError, match="3 classes"):
        EnsembleKD(bad).build_model(info)


# ---- the schema imports no torch ----------------------------------------------------------------
def test_validating_a_config_imports_no_torch():
    import subprocess

    code = ("import sys; import metaensemble.methods; from metaensemble.config import build_config; "
            "c = build_config({'method': 'weightformer', 'meta': {'ensemble_size': 3}, 'distill': {'alpha': 0.5}}); "
            "assert c.meta.ensemble_size == 3 and c.distill.alpha == 0.5; "
            "bad = [m for m in ('torch', 'ray', 'mlflow') if m in sys.modules]; print(bad); assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout


# ---- one driver per run ------------------------------------------------------------------------
def test_a_run_being_trained_by_another_live_driver_is_refused(ray_local, digits_cfg):
    import socket

    from metaensemble.errors import ConfigError

    cfg = digits_cfg()
    client = tracking.client()
    handle = tracking.open_run(client, cfg, cfg.run_key())
    # another driver on this machine, alive (this test's parent process), holds the run
    tracking.set_tags(client, handle.run_id, {"metaensemble.driver": f"{socket.gethostname()}:{os.getppid()}"})
    with pytest.raises(ConfigError, match="being trained right now"):
        fit(cfg)
    assert client.get_run(handle.run_id).info.status == "RUNNING"
    assert len(list(Path(cfg.resolved_storage_path()).glob("*"))) == 0, "nothing may be written"


def test_evaluate_refuses_bad_input_before_any_run_exists(mlflow_uri, digits_cfg):
    from metaensemble.errors import ConfigError

    cfg = digits_cfg()
    wrong = create_model("convnet", num_classes=3, in_chans=1, img_size=8, width=8)
    with pytest.raises(ConfigError, match="3 classes"):
        engine.evaluate(wrong, cfg)
    with pytest.raises(ConfigError, match="create_model"):
        engine.evaluate(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), cfg)
    exp = tracking.client().get_experiment_by_name(cfg.experiment_name)
    assert exp is None or not tracking.client().search_runs([exp.experiment_id])
