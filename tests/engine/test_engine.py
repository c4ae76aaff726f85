"""The engine on a real local Ray instance (gloo DDP) with a real MLflow server."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from metaensemble import data, tracking
from metaensemble.config import DataConfig
from metaensemble.engine import fit
from metaensemble.errors import ConfigError, DataError
from metaensemble.methods import Method
from metaensemble.models import unwrap
from metaensemble.validation import load_config


class RecordingMethod(Method):
    """Supervised training that also records, per rank and epoch, which examples the
    rank trained on and its parameters afterwards (and can be slowed down)."""

    def __init__(self, cfg, out_dir, sleep: float = 0.0) -> None:
        super().__init__(cfg)
        self.out_dir, self.sleep, self._seen = str(out_dir), sleep, []

    def training_step(self, model, batch):
        self._seen.append(batch["index"].clone())
        if self.sleep:
            time.sleep(self.sleep)
        return super().training_step(model, batch)

    def rebuild(self, model, epoch):
        params = torch.cat([p.detach().flatten().cpu() for p in unwrap(model).parameters()])
        path = os.path.join(self.out_dir, f"rank{self.context.rank}-epoch{epoch - 1}-pid{os.getpid()}.safetensors")
        save_file({"seen": torch.cat(self._seen), "params": params}, path + ".partial")
        os.replace(path + ".partial", path)  # whole or absent: a test may kill this process
        self._seen = []
        return None


@pytest.fixture(autouse=True, scope="module")
def _pickle_this_module_by_value():
    # Ray workers cannot import test modules; ship RecordingMethod's code with it.
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _records(out: Path):
    recs = []
    for f in sorted(out.glob("*.safetensors"), key=lambda f: f.stat().st_mtime_ns):  # in the order written
        rank, epoch, pid = (int(p[len(k):]) for p, k in zip(f.stem.split("-"), ("rank", "epoch", "pid"), strict=True))
        recs.append({"rank": rank, "epoch": epoch, "pid": pid, **load_file(str(f))})
    return recs


def _registered_epochs(run_dir: Path) -> list[int]:
    """Epochs of the checkpoints Ray Train's controller has registered (and so will
    resume from); a checkpoint folder on disk is not registered until this lists it."""
    import json

    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [int(r["metrics"]["epoch"]) for r in snap.get("checkpoint_results", [])]


def _runs_with_key(cfg, run_key):
    c = tracking.client()
    exp = c.get_experiment_by_name(cfg.experiment_name)
    return c.search_runs([exp.experiment_id], f"tags.`metaensemble.run_key` = '{run_key}'")


def _digits_folder(root: Path) -> None:
    """The digits as 16x16 PNGs in the ImageNet layout (train/ = digits' train + val, val/ =
    its test split), so the encoded-image path has a task it can learn."""
    from PIL import Image

    splits = data.load(DataConfig())
    for sub, parts in (("train", (splits.train, splits.val)), ("val", (splits.test,))):
        for part in parts:
            for img, y, i in zip(part.images, part.labels.tolist(), part.index.tolist(), strict=True):
                (root / sub / str(y)).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img[0].numpy()).resize((16, 16), Image.NEAREST).save(root / sub / str(y) / f"{i}.png")


def test_encoded_shards_stream_through_ray_data_into_ddp_training(ray_local, digits_cfg, tmp_path, ray_run_dir,
                                                                  worker_killer):
    """Image files -> encoded parquet shards -> Ray Data decodes on its own workers ->
    2-worker DDP on disjoint shards; a shard of corrupt images is dropped and counted, not a
    crash (nor a DDP hang: the ranks keep taking equal steps). A worker killed once the
    first epoch's checkpoint is registered: Ray Train restarts the group from it, the train
    stream is opened again (in the epoch order the checkpoint continues:
    tests/data/test_parquet_stream.py) and every epoch still covers the readable rows."""
    from metaensemble.data.parquet import write_image_folder

    _digits_folder(tmp_path / "folder")
    root = write_image_folder(tmp_path / "folder", tmp_path / "pq", image_size=16, shard_mb=0.05, progress=False)
    f = sorted((root / "train").glob("*.parquet"))[1]  # every image of one shard rots after writing
    t = pq.read_table(f)
    pq.write_table(t.set_column(0, "image", pa.array([b"\x89PNG rotten"] * len(t), pa.binary()))
                   .replace_schema_metadata(pq.read_schema(f).metadata), f)
    bad = set(t.column("index").to_pylist())
    for split in ("val", "test"):  # and one row of each evaluation split
        f = sorted((root / split).glob("*.parquet"))[0]
        t = pq.read_table(f)
        images = t.column("image").to_pylist()
        t = t.set_column(0, "image", pa.array([b"\xff\xd8 rotten", *images[1:]], pa.binary()))
        pq.write_table(t.replace_schema_metadata(pq.read_schema(f).metadata), f)
    epochs = 2  # the kill lands in the second (a streamed epoch restarts its pipeline: seconds)
    cfg = digits_cfg("data.name=parquet", f"data.root={root}", "scaling.num_workers=2", f"train.epochs={epochs}",
                     "model.kwargs.width=16", "data.batch_size=32", "data.augment=false", "data.shuffle_buffer=256",
                     "data.data_cpus=2", "scaling.max_failures=1")
    out = tmp_path / "rec"
    out.mkdir()
    run_dir = ray_run_dir(cfg)

    def rank1_after_the_first_checkpoint():
        if 1 in _registered_epochs(run_dir.path()) and (recs := list(out.glob("rank1-epoch0-*"))):
            return int(recs[0].stem.split("pid")[1])
        return None

    killer = worker_killer(rank1_after_the_first_checkpoint)
    outcome = fit(cfg, method=RecordingMethod(cfg, out, sleep=0.05))  # 25 steps: over a second an epoch
    assert killer.join(), "the worker was never killed"
    run = tracking.client().get_run(outcome.run_id)
    resumed = int(run.data.tags["metaensemble.resumed_from_epoch"])
    assert 1 <= resumed < epochs and run.info.status == "FINISHED"
    recs = _records(out)
    # the epoch the checkpoint resumes at was trained again, by the restarted group
    assert [r for r in recs if r["rank"] == 1 and r["epoch"] == resumed][-1]["pid"] not in killer.killed
    n_train = json.loads((root / "meta.json").read_text())["sizes"]["train"]
    for epoch in range(epochs):  # the last record of each rank and epoch: a restarted epoch's
        s0, s1 = ([r for r in recs if r["rank"] == k and r["epoch"] == epoch][-1]["seen"].tolist() for k in (0, 1))
        assert s0 and s1 and not (set(s0) & set(s1)), "Ray Data shards must be disjoint"
        assert not bad & set(s0 + s1)
        assert len(set(s0 + s1)) >= n_train - len(bad) - 2 * 32, "every readable row, up to the dropped partial batches"
    client = tracking.client()
    skipped = {m.step: m.value for m in client.get_metric_history(outcome.run_id, "data_skipped")}
    assert sorted(skipped) == list(range(1, epochs + 1)), skipped
    assert all(len(bad) - 2 * 32 <= v <= len(bad) for v in skipped.values()), "the corrupt images are dropped and counted"
    # the evaluation splits count theirs too: val at every epoch and at the end, test at the end
    history = {k: [m.value for m in client.get_metric_history(outcome.run_id, k)] for k in ("val_skipped", "test_skipped")}
    assert set(history["val_skipped"]) == {1} and len(history["val_skipped"]) >= epochs + 1, history
    assert history["test_skipped"] == [1], history
    assert outcome.metrics["val_skipped"] == outcome.metrics["test_skipped"] == 1
    # one epoch already reached 0.35-0.6 (one shard short); images paired with the wrong labels stay
    # near 0.1 (+-0.02 on these 359 test images)
    assert outcome.metrics["test_acc"] > 0.25, outcome.metrics


def test_two_worker_gloo_ddp_and_a_pack_trains_each_member_as_alone_and_skips_finished_members(
        ray_local, digits_cfg, tmp_path):
    """A run on a 2-worker gloo DDP group: the ranks see disjoint halves of the data and
    keep identical parameters. Then fit_pack: several runs one after another in one
    2-worker gloo group, each its own MLflow run under its own run key. A member trained
    after another in the same worker processes ends with exactly the weights and metrics
    that run got alone (so a seed gives one result however it is run); finished members
    are not trained again."""
    from metaensemble import models
    from metaensemble.engine import fit_pack

    exp = f"test/pack-{os.urandom(4).hex()}"
    cfgs = [digits_cfg("scaling.num_workers=2", f"seed={s}", f"experiment={exp}") for s in (1, 0)]
    before = _mlflow_state()
    with pytest.raises(ConfigError, match="same scaling section"):
        fit_pack([cfgs[0], cfgs[1].with_overrides({"scaling.num_workers": 1})])
    assert _mlflow_state() == before

    # the run alone, recording what each rank trained on (the recording changes no weight)
    cfg = digits_cfg("scaling.num_workers=2", "seed=0", f"storage_path={tmp_path / 'alone'}")
    out = tmp_path / "rec"
    out.mkdir()
    alone = fit(cfg, method=RecordingMethod(cfg, out))
    outs = fit_pack(cfgs)
    recs = _records(out)
    assert {(r["rank"], r["epoch"]) for r in recs} == {(0, 0), (1, 0), (0, 1), (1, 1)}
    n_train = len(data.load(cfg.data).train)
    for epoch in (0, 1):
        r0, r1 = (next(r for r in recs if r["rank"] == k and r["epoch"] == epoch) for k in (0, 1))
        s0, s1 = set(r0["seen"].tolist()), set(r1["seen"].tolist())
        assert len(s0) == len(r0["seen"]) and not (s0 & s1), "ranks must see disjoint examples"
        assert len(s0) == len(s1) >= n_train // 2 - cfg.data.batch_size, "each rank sees about half the data"
        assert torch.equal(r0["params"], r1["params"]), "DDP must keep both ranks' parameters identical"
    assert alone.metrics["test_acc"] > 0.5 and not alone.skipped

    assert not any(o.skipped for o in outs)
    for c, o in zip(cfgs, outs, strict=True):
        (run,) = _runs_with_key(c, c.run_key())
        assert run.info.run_id == o.run_id and run.info.status == "FINISHED"
    ray_runs = {_runs_with_key(c, c.run_key())[0].data.tags.get("metaensemble.ray_run") for c in cfgs}
    assert len(ray_runs) == 1 and None not in ray_runs, "both members trained in one Ray Train run"

    packed, single = (models.load(f"runs:/{o.run_id}/model").state_dict() for o in (outs[1], alone))
    assert packed.keys() == single.keys() and all(torch.equal(packed[k], single[k]) for k in single)
    for k in ("val_acc", "val_nll", "test_acc", "test_nll"):
        assert outs[1].metrics[k] == pytest.approx(alone.metrics[k], abs=1e-7)
    assert outs[0].metrics["test_acc"] > 0.2  # two epochs of width 8; chance is 0.1

    again = fit_pack(cfgs)  # the same pack again: every member finished, nothing trained
    assert all(o.skipped for o in again) and [o.run_id for o in again] == [o.run_id for o in outs]


def test_worker_killed_mid_pack_resumes_the_member_it_was_training(ray_local, digits_cfg):
    """A worker dies while the second member of a pack trains: Ray Train restarts the
    group from the latest checkpoint, which belongs to that member, so the first member
    is not trained again and the second continues from its checkpoint. (The first member
    is short; the second is long enough that the kill always lands while it trains.)"""
    from ray.util.state import list_actors

    from metaensemble.engine import fit_pack

    exp = f"test/packkill-{os.urandom(4).hex()}"
    first_epochs, epochs = 2, 24
    cfgs = [digits_cfg(f"train.epochs={e}", "scaling.max_failures=2", f"seed={s}", f"experiment={exp}")
            for s, e in ((0, first_epochs), (1, epochs))]
    client = tracking.client()
    killed: list[int] = []

    def kill_during_second_member():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            runs = _runs_with_key(cfgs[1], cfgs[1].run_key()) if client.get_experiment_by_name(exp) else []
            if runs and len(client.get_metric_history(runs[0].info.run_id, "epoch")) >= 3:
                workers = list_actors(address=ray_local.get_runtime_context().gcs_address,  # not another instance's
                                      filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                (w,) = workers
                os.kill(w.pid, signal.SIGKILL)
                killed.append(w.pid)
                return
            time.sleep(0.25)  # the kill has 21 epochs of room: no need for 40-60 MLflow queries a second

    killer = threading.Thread(target=kill_during_second_member, daemon=True)
    killer.start()
    outs = fit_pack(cfgs)
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    first, second = (client.get_run(o.run_id) for o in outs)
    assert first.info.status == second.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first.info.run_id, "epoch")] == \
        list(range(1, first_epochs + 1)), "the finished member was trained again"
    assert "metaensemble.resumed_from_epoch" not in first.data.tags
    resumed_from = int(second.data.tags["metaensemble.resumed_from_epoch"])
    assert 1 <= resumed_from < epochs
    assert "test_acc" in second.data.metrics and "test_acc" in first.data.metrics


def _mlflow_state():
    c = tracking.client()
    exps = c.search_experiments()
    return sorted(e.name for e in exps), len(c.search_runs([e.experiment_id for e in exps])) if exps else 0


@pytest.mark.parametrize("overrides,error,match", [
    (["data.name=cifar10", "data.root=/no/such/dir"], DataError, r"cifar-10-batches-py"),
    (["model.kwargs.depth=3"], ConfigError, r"'convnet' does not take depth; it takes: .*width"),
    (["train.select_metric=test_acc"], ConfigError, r"select_metric must be one of val_acc"),
])
def test_bad_input_fails_before_anything_is_written(ray_local, digits_cfg, tmp_path, overrides, error, match):
    before = _mlflow_state()
    cfg = digits_cfg(*overrides)
    with pytest.raises(error, match=match):
        fit(cfg)
    assert _mlflow_state() == before
    assert not (tmp_path / "ray").exists()


DRIVER = """
import os, sys, time
import torch
from safetensors.torch import save_file
from metaensemble.engine import fit
from metaensemble.methods import Method
from metaensemble.models import unwrap
from metaensemble.validation import load_config

{recording_method}
cfg = load_config("configs/teachers/digits.yaml", sys.argv[2:])
fit(cfg, method=RecordingMethod(cfg, sys.argv[1], sleep=0.08))
"""


def test_a_worker_then_the_driver_killed_mid_run_resume_in_the_same_mlflow_run(
        ray_run_dir, worker_killer, ray_local, mlflow_uri, digits_cfg, tmp_path):
    """One run, two failures. A worker is killed mid-run: Ray Train restarts it from the
    newest checkpoint its controller registered (never from 0), within the same driver and
    MLflow run. Then the driver itself is killed, once the restarted worker has registered
    a checkpoint of its own: the same command again resumes the same MLflow run from
    there, to the last epoch. The same command once more trains and writes nothing."""
    import inspect
    import subprocess

    from ray.util.state import list_actors

    epochs = 10  # those after the driver's death train fast, in this process
    cfg = digits_cfg(f"train.epochs={epochs}", "scaling.max_failures=2")
    # the same config as digits_cfg's (same run key), so both commands are one run
    args = [f"storage_path={cfg.storage_path}", f"experiment={cfg.experiment}", f"train.epochs={epochs}",
            "scaling.max_failures=2", "model.kwargs.width=8", "data.val_fraction=0.1", "model.init_seed=null"]
    assert load_config("configs/teachers/digits.yaml", args).run_key() == cfg.run_key()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.replace("{recording_method}", inspect.getsource(RecordingMethod)))
    out = tmp_path / "rec"
    out.mkdir()
    run_dir = ray_run_dir(cfg)

    def worker_after_two_checkpoints():
        if len(list(run_dir.glob("checkpoint_*"))) >= 2 and (recs := list(out.glob("rank0-epoch2-*"))):
            return int(recs[0].stem.split("pid")[1])  # the RayTrainWorker process, mid epoch 3 or 4
        return None

    client = tracking.client()

    def resumed_tag() -> int | None:
        if client.get_experiment_by_name(cfg.experiment_name) is None:
            return None
        runs = _runs_with_key(cfg, cfg.run_key())
        tag = runs[0].data.tags.get("metaensemble.resumed_from_epoch") if runs else None
        return None if tag is None else int(tag)

    gcs = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": gcs, "MLFLOW_TRACKING_URI": mlflow_uri}
    repo = Path(__file__).resolve().parents[2]
    killer = worker_killer(worker_after_two_checkpoints)
    with open(tmp_path / "driver.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(script), str(out), *args], cwd=repo, env=env, stdout=log,
                                stderr=log)
        # the worker dies; its driver restarts it from a registered checkpoint, which tags
        # the run; wait until the restarted worker has registered a checkpoint of its own
        deadline = time.monotonic() + 300
        resumed_in_driver = None
        while time.monotonic() < deadline and proc.poll() is None:
            if killer.killed and resumed_in_driver is None:
                resumed_in_driver = resumed_tag()
            if resumed_in_driver is not None and max(_registered_epochs(run_dir), default=0) > resumed_in_driver:
                break
            time.sleep(0.1)
        registered = _registered_epochs(run_dir)
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        proc.kill()  # the driver dies mid-run, after Ray registered the restarted worker's checkpoint
        proc.wait()
    killed = killer.join()
    assert killed, "the worker was never killed"
    deadline = time.monotonic() + 60  # Ray reaps the dead driver's controller and workers
    while list_actors(address=gcs, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]) \
            and time.monotonic() < deadline:
        time.sleep(0.5)

    # the worker's death, inside the driver: the restarted worker resumed from the newest
    # checkpoint Ray's controller had registered (the kill came after two were written; the
    # second may not have been collected yet), never from 0, at exactly the epoch after it
    recs = _records(out)
    pids = {r["pid"] for r in recs}
    assert len(pids) == 2 and killed[0] in pids
    restarted = [r for r in recs if r["pid"] != killed[0]]
    assert resumed_in_driver >= 1, "training restarted from scratch instead of the checkpoint"
    assert min(r["epoch"] for r in restarted) == resumed_in_driver
    first = _runs_with_key(cfg, cfg.run_key())
    assert len(first) == 1 and first[0].info.status == "RUNNING"

    # the driver's death: the same command again resumes the same MLflow run
    outcome = fit(cfg, method=RecordingMethod(cfg, out))
    runs = _runs_with_key(cfg, cfg.run_key())
    assert len(runs) == 1 and runs[0].info.run_id == first[0].info.run_id == outcome.run_id
    assert runs[0].info.status == "FINISHED" and not outcome.skipped
    resumed_from = int(runs[0].data.tags["metaensemble.resumed_from_epoch"])
    assert resumed_from >= max(registered) > resumed_in_driver
    after = [r for r in _records(out) if r["pid"] not in pids]
    assert min(r["epoch"] for r in after) == resumed_from
    assert max(r["epoch"] for r in after) == epochs - 1
    assert outcome.metrics["epoch"] == epochs and "test_acc" in outcome.metrics
    assert "test_acc" in runs[0].data.metrics

    # The same command once more: nothing is retrained, nothing new is written.
    n_files, n_ckpts = len(list(out.iterdir())), len(list(run_dir.glob("checkpoint_*")))
    again = fit(cfg, method=RecordingMethod(cfg, out))
    assert again.skipped and again.run_id == outcome.run_id
    assert again.metrics["test_acc"] == pytest.approx(runs[0].data.metrics["test_acc"])
    assert len(list(out.iterdir())) == n_files and len(list(run_dir.glob("checkpoint_*"))) == n_ckpts
    assert len(_runs_with_key(cfg, cfg.run_key())) == 1


def test_init_seed_fixes_the_initial_weights_and_leaves_the_rest_to_the_seed(digits_cfg):
    """model.init_seed: runs with different seeds and one init_seed start from identical
    weights, while what follows (data order, augmentation) still draws from the run's seed;
    without it the initial weights follow the seed."""
    from metaensemble import data, methods
    from metaensemble.engine.loop import build_initial_model, seed_rank

    def start(*overrides, rank=0):
        cfg = digits_cfg(*overrides)
        method = methods.build(cfg)
        model = build_initial_model(method, data.load(cfg.data).info, cfg)
        seed_rank(cfg.seed, rank)  # as the loop does after building the model
        return [p.detach().clone() for p in model.parameters()], torch.rand(4)

    (w1, r1), (w2, r2) = start("seed=1", "model.init_seed=7"), start("seed=2", "model.init_seed=7")
    assert all(torch.equal(a, b) for a, b in zip(w1, w2, strict=True))
    assert not torch.equal(r1, r2)
    (w3, _), (w4, _) = start("seed=1", "model.init_seed=null"), start("seed=2", "model.init_seed=null")
    assert not all(torch.equal(a, b) for a, b in zip(w3, w4, strict=True))
    torch.manual_seed(1)
    assert torch.equal(r1, torch.rand(4))  # after the model, rank 0's RNG restarts from the run's seed
    w5, r5 = start("seed=1", "model.init_seed=7", rank=1)
    assert all(torch.equal(a, b) for a, b in zip(w1, w5, strict=True)), "every rank builds the same weights"
    assert not torch.equal(r1, r5), "each rank draws its own augmentation/dropout stream"


def test_the_console_keeps_every_runs_line_and_drops_the_raylets_worker_count_warning():
    """Ray's driver-side filter with the engine's settings: two runs' lines that differ
    only in numbers both print (Ray would merge them), Ray's own log lines still merge,
    and the raylet's worker-count warning is dropped."""
    from ray._private.ray_logging import LogDeduplicator

    from metaensemble.engine.trainer import CONSOLE_ENV

    dedup = LogDeduplicator(5, CONSOLE_ENV["RAY_DEDUP_LOGS_ALLOW_REGEX"], CONSOLE_ENV["RAY_DEDUP_LOGS_SKIP_REGEX"])
    default = LogDeduplicator(5, None, None)

    def printed(d, pid, line):
        return [x for b in d.deduplicate({"ip": "n", "pid": pid, "lines": [line]}) for x in b["lines"]]

    runs = ["[teachers-convnet-ed4baf6294f4-s0] done: 2 epochs in 1s, val_acc 0.7309",
            "[teachers-convnet-ed4baf6294f4-s1] done: 2 epochs in 1s, val_acc 0.7657"]
    assert printed(default, 1, runs[0]) and not printed(default, 2, runs[1]), "Ray alone merges them"
    assert printed(dedup, 1, runs[0]) == [runs[0]] and printed(dedup, 2, runs[1]) == [runs[1]]
    ray_line = "[2026-12-06 02:14:53,060 E 5105 5204] core_worker.cc:2465: Actor with class name: 'X'"
    assert printed(dedup, 1, ray_line) and not printed(dedup, 2, ray_line.replace("5105", "5106")), \
        "Ray's own lines are still merged"
    warning = ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: 1.2.3.4, "
               "which is 4x the maximum expected startup concurrency (2).")
    assert printed(default, "raylet", warning) and not printed(dedup, "raylet", warning)
