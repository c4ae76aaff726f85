"""The meta-train job end to end: `ray job submit` against a real `ray start --head`
cluster, reading its teacher zoo from a real MLflow server's registry; and its bad input."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from metaensemble.config import REPO_ROOT
from metaensemble.tracking.store import free_ports

JOB = [sys.executable, "jobs/meta_train.py"]


def _tiny(tmp: Path, experiment: str, zoo_seed0: int) -> list[str]:
    """A small but complete run: a 6-teacher zoo of width-4 convnets (1 epoch each),
    K=2, WeightFormer (2-worker DDP) + one KD pair (the MLP generator and the ablations
    are the same engine path with other configs; the unit tests cover them)."""
    teacher = tmp / "teachers.yaml"
    teacher.write_text((REPO_ROOT / "configs/teachers/digits.yaml").read_text()
                       .replace("kwargs: {width: 16}", "kwargs: {width: 4}")
                       .replace("epochs: 15", "epochs: 1")
                       .replace("warmup_epochs: 1", "warmup_epochs: 0")
                       .replace("num_teachers: 4", f"num_teachers: 6\n  first_seed: {zoo_seed0}"))
    return [f"storage_path={tmp / 'ray'}", f"experiment={experiment}", f"meta.teacher_config={teacher}",
            "model.kwargs.student_kwargs={width: 4}", "model.kwargs.d_model=16", "model.kwargs.heads=2",
            "meta.ensemble_size=2", "meta.train_k=[]", "meta.zoo_size=6", "meta.num_val_teachers=2",
            "meta.num_test_teachers=2", "meta.val_ensembles=2", "meta.test_ensembles=2", "meta.ablations=[]",
            "meta.report_k=[2]", "meta.report_k_ensembles=1", "meta.bootstrap=200",
            "meta.kd_ensembles=1", "meta.kd_epochs=1", "meta.ceiling_ensembles=1", "train.epochs=1", "train.steps_per_epoch=5",
            "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
            "data.batch_size=32"]  # the ~100-image subset split over 2 workers


@pytest.fixture
def ray_head(tmp_path, mlflow_uri):
    """`ray start --head --block` (token auth, as Ray >= 2.59 sets up) on free ports, in
    its own process group so that tearing it down leaves the session's Ray alone
    (`ray stop` would stop every Ray instance on the machine)."""
    import signal
    import urllib.error
    import urllib.request

    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")
    port, dash, *others = free_ports(2 + len(flags))  # all distinct
    # token auth with a token of its own: a fresh machine has no ~/.ray/auth_token until a
    # local instance makes one, so the head and the submitting client must be given one
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    temp = Path("/tmp") / f"rh{uuid.uuid4().hex[:6]}"
    log = open(tmp_path / "ray_head.log", "w")
    # Every port of its own: the session's local Ray instance already holds the defaults
    # (its dashboard agent on 52365 would leave this head without a job agent).
    own = [f"--{flag}={p}" for flag, p in zip(flags, others, strict=True)]
    proc = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}", *own,
                             "--num-cpus=4", "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # answering (401 under token auth): it is up
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("ray start --head did not come up: " + (tmp_path / "ray_head.log").read_text()[-2000:]) from None
            time.sleep(1)
    yield url, f"127.0.0.1:{port}", env
    # SIGKILL to the group ends every process of this head (measured: none is left outside
    # it), where `ray start --block` takes over 5 s to stop on SIGTERM
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


def _register_zoo(tmp: Path, overrides: list[str], mlflow_uri: str) -> None:
    """Train the recipe's 6 teachers in this process (one epoch each: seconds, where 6 Ray
    Train runs cost minutes on 2 cores) and register them exactly as the teacher-zoo job
    does: an MLflow run with the model artifact, a registry version tagged with seed and
    recipe hash. (The job's own zoo training is tested in tests/tracking and tests/test_jobs.)"""
    _train_and_register(tmp, overrides, mlflow_uri)  # one torch thread: conftest's session fixture


def _train_and_register(tmp: Path, overrides: list[str], mlflow_uri: str) -> None:
    import torch
    import torch.nn.functional as F
    from mlflow.tracking import MlflowClient

    from metaensemble import data
    from metaensemble.models import create_model, save_model
    from metaensemble.tracking import TeacherZoo
    from metaensemble.validation import load_config

    meta = load_config("configs/meta/digits.yaml", overrides)
    tcfg = load_config(meta.meta.teacher_config, [f"zoo.num_teachers={meta.meta.zoo_size}"])
    splits = data.load(tcfg.data)
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("digits/teachers") or client.get_experiment(client.create_experiment("digits/teachers"))
    zoo = TeacherZoo("digits", "convnet", mlflow_uri)
    for seed in range(tcfg.zoo.first_seed, tcfg.zoo.first_seed + meta.meta.zoo_size):
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        m = create_model("convnet", num_classes=10, in_chans=1, img_size=8, **tcfg.model.kwargs)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        for b in data.ArrayLoader(splits.train, splits.info, 64, shuffle=True, seed=seed, drop_last=True):
            opt.zero_grad()
            F.cross_entropy(m(b["x"]), b["y"]).backward()
            opt.step()
        run = client.create_run(exp.experiment_id, run_name=f"teacher-{seed}")
        client.log_metric(run.info.run_id, "train_time_s", time.perf_counter() - t0, step=1)  # as the engine logs it
        client.log_artifacts(run.info.run_id, str(save_model(m.eval(), tmp / f"t{seed}", dataset="digits")), "model")
        client.set_terminated(run.info.run_id)
        zoo.register(run.info.run_id, seed, tcfg.config_hash(), {})


def _edited_copy(tmp: Path) -> tuple[Path, str]:
    """A copy of the checkout (no venv, runs or git) whose library prints a token from the
    job's driver (cli.run_job) and from every Ray Train worker (engine.loop)."""
    copy = tmp / "checkout"
    shutil.copytree(REPO_ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "*.egg-info",
                                                                   ".pytest_cache", ".ruff_cache"))
    token = f"EDITED-{uuid.uuid4().hex[:8]}"
    lib = copy / "platform" / "metaensemble"
    for rel, anchor, line in (
        ("cli.py", "    try:\n        code = main()", f"    print('{token} driver', flush=True)\n"),
        ("engine/loop.py", "    cfg = build_config(member[\"cfg\"])\n",
         f"    from metaensemble.config import REPO_ROOT as _r\n"
         f"    print('{token} worker root', _r, 'exists', (_r / 'tiny_teachers.yaml').is_file(), "
         f"file=sys.__stdout__, flush=True)\n"),
    ):
        src = (lib / rel).read_text()
        assert src.count(anchor) == 1, (rel, anchor)
        (lib / rel).write_text(src.replace(anchor, line + anchor if rel == "cli.py" else anchor + line))
    return copy, token


def test_ray_job_submit_runs_the_whole_pipeline_from_the_zoo(ray_head, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from metaensemble.methods.distill import checkpoint_sha256
    from metaensemble.models import load, local_dir

    dashboard, _, env = ray_head
    experiment = f"test/meta-{uuid.uuid4().hex[:6]}"
    seed0 = 1000 + int(uuid.uuid4().int % 10_000) * 10  # this test's own zoo: no teacher of these seeds exists
    _register_zoo(tmp_path, _tiny(tmp_path, experiment, seed0), mlflow_uri)
    # Submitted from an edited copy of the checkout: the job must run the copy's library, in
    # the driver and in the Ray workers, and resolve relative paths in the copy (the
    # teacher recipe exists there only), whatever is installed.
    copy, token = _edited_copy(tmp_path)
    args = _tiny(tmp_path, experiment, seed0)
    shutil.move(tmp_path / "teachers.yaml", copy / "tiny_teachers.yaml")
    args = [a if not a.startswith("meta.teacher_config=") else "meta.teacher_config=tiny_teachers.yaml" for a in args]
    # one torch thread in the driver, as the engine sets in its workers (tiny networks on
    # two shared cores: a second thread only synchronises)
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": mlflow_uri, "OMP_NUM_THREADS": "1"}})
    cmd = ["ray", "job", "submit", "--address", dashboard, "--working-dir", ".", "--runtime-env-json", runtime_env,
           "--", "python", "jobs/meta_train.py", *args]
    for _ in range(10):  # the job agent comes up a little after the dashboard answers
        proc = subprocess.run(cmd, cwd=copy, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True,
                              text=True, timeout=900)
        out = proc.stdout + proc.stderr
        if "No available agent to submit job" not in out:
            break
        time.sleep(3)
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out
    # train_configs' Tune path: the KD pack and the generator as two trials side by side,
    # whose configs are indices into the trainable's parameters, not whole configs copied
    # into every result row
    params = sorted(json.loads(f.read_text())["params"] for f in (tmp_path / "ray").glob("meta/*/*/params.json"))
    assert params == [0, 1], params
    for label in ("mean single teacher", "anchor teacher", "ensemble (prob. average)",
                  "naive weight average", "KD student (subset)", "KD student (full train)", "WeightFormer zero-shot",
                  "WeightFormer + finetune", "paired bootstrap 95% intervals", "WeightFormer zero-shot - anchor teacher",
                  "gap closed by zero-shot", "pays for itself after", "relative L2 distance",
                  "to the nearest of their teachers",
                  "zero-shot at other ensemble sizes", "BatchNorm: every network scored here",
                  "generators: WeightFormer"):
        assert label in out, label
    assert "training the rest" not in out  # the registered zoo was found and used
    assert f"{token} driver" in out and f"{token} worker" in out, "the submitted copy's edits ran"
    # on the workers too, relative paths resolve in the job's working directory
    roots = re.findall(rf"{token} worker root (\S+) exists (\w+)", out)
    assert roots and all("working_dir_files" in r and e == "True" for r, e in roots), roots

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], "tags.`metaensemble.job` = 'meta_train'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"eval_table.md", "eval_table.json", "eval_bars.png", "teachers.json", "eval_table_mlflow.json",
            "evaluation.json", "evaluation.txt"} <= arts
    evaluation = json.loads(Path(client.download_artifacts(parent.info.run_id, "evaluation.json", str(tmp_path))).read_text())
    diffs = {d["label"]: d for d in evaluation["differences"]}
    d = diffs["WeightFormer zero-shot - anchor teacher"]
    assert d["n"] == 2 and d["lo"] <= d["mean"] <= d["hi"]
    c = evaluation["cost"]  # WeightFormer and KD on the same boundaries
    assert c["wf_ready_s"] > 0 and c["kd_ready_s"] > c["kd_train_s"] > 0 and c["fetch_s"] > 0
    assert c["wf_e2e_s"] == pytest.approx(c["fetch_s"] + c["wf_ready_s"])
    assert c["kd_e2e_s"] == pytest.approx(c["fetch_s"] + c["kd_ready_s"])
    assert c["wf_ready_s"] == pytest.approx(c["prep_s"] + c["generate_bn_s"])
    # amortised: meta-training's epochs and the 4 zoo teachers that exist only for it
    assert c["zoo_only_teachers"] == 4 and c["zoo_only_missing"] == 0 and c["zoo_only_s"] > 0
    assert c["amortised_s"] == pytest.approx(c["meta_train_s"] + c["zoo_only_s"])
    # the break-even count: ensembles whose saving (KD's time less the generator's, the
    # fetch being the same for both) pays back the one-off cost
    saving = c["kd_ready_s"] - c["wf_ready_s"]
    assert saving > 0 and c["break_even_ensembles"] == math.ceil(c["amortised_s"] / saving)
    assert evaluation["sizes"]["values"] > 0 and evaluation["sizes"]["weightformer"] > 0
    assert len(evaluation["distances"]["rel_l2_to_anchor"]) == 2 and [r["k"] for r in evaluation["by_k"]] == [2]
    # the anchor is one of each student's teachers, so the nearest teacher is at most as far
    near, anchor = evaluation["distances"]["rel_l2_to_nearest"], evaluation["distances"]["rel_l2_to_anchor"]
    assert len(near) == 2 and all(0 <= n <= a + 1e-9 for n, a in zip(near, anchor, strict=True)), (near, anchor)
    png = Path(client.download_artifacts(parent.info.run_id, "eval_bars.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "eval_table.json", str(tmp_path))).read_text())
    keys = {r["key"] for r in table}
    assert {"mean_teacher", "anchor", "ensemble", "weight_average", "best_member", "greedy_soup", "learned_soup",
            "kd_subset", "kd_full", "kd_long", "fit", "weightformer", "weightformer_ft"} == keys
    assert {"WeightFormer zero-shot - greedy soup", "WeightFormer zero-shot - learned soup",
            "WeightFormer zero-shot - ceiling: KD 4x longer",
            "WeightFormer zero-shot - ceiling: output form fit by KD"} <= set(diffs)
    assert {r["key"]: r["n"] for r in table}["fit"] == 1
    for r in table:
        assert 0.0 <= r["acc"] <= 1.0 and r["nll"] > 0 and r["n"] >= 1
        assert len(r["accs"]) == r["n"] and abs(sum(r["accs"]) / r["n"] - r["acc"]) < 1e-9

    # which teachers: versions logged, split by checkpoint, held-out ones never trained on
    teachers = json.loads(Path(client.download_artifacts(parent.info.run_id, "teachers.json", str(tmp_path))).read_text())["teachers"]
    assert len(teachers) == 6 and {t["side"] for t in teachers} == {"train", "val", "test"}
    assert {t["seed"] for t in teachers} == set(range(seed0, seed0 + 6))
    by_side = {s: {t["sha256"] for t in teachers if t["side"] == s} for s in ("train", "val", "test")}
    assert by_side["test"].isdisjoint(by_side["train"] | by_side["val"]) and by_side["train"].isdisjoint(by_side["val"])
    for t in teachers:  # the logged hash is the registered checkpoint's
        assert checkpoint_sha256(local_dir(t["uri"])) == t["sha256"]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    gen_runs = [c for c in children if c.data.params.get("method") == "weightformer"]
    ft_runs = [c for c in children if c.data.tags.get("metaensemble.finetune_of") == "weightformer"]
    fit_runs = [c for c in children if c.data.tags.get("metaensemble.finetune_of") == "fit"]
    long_runs = [c for c in children if c.data.params.get("train.epochs") == "4"]
    # WeightFormer, KD on the subset and on the full split, one finetune per test ensemble,
    # and the two ceilings of the first ensemble (KD 4x longer, the average fit by KD)
    assert len(gen_runs) == 1 and len(ft_runs) == 2 and len(children) == 7
    assert len(fit_runs) == 1 and len(long_runs) == 1 and long_runs[0].data.params["method"] == "kd"
    assert fit_runs[0].data.params["model.init_from"].startswith(f"runs:/{parent.info.run_id}/fit_init/")
    test_uris = {t["uri"] for t in teachers if t["side"] == "test"}
    # the finetuning is KD engine runs from the generated students, on held-out teachers only
    for c in ft_runs:
        p = c.data.params
        assert c.info.status == "FINISHED" and p["method"] == "kd" and p["train.epochs"] == "1"
        assert p["model.init_from"].startswith(f"runs:/{parent.info.run_id}/finetune_init/")
        assert set(json.loads(p["distill.teachers"])) <= test_uris
        assert p["optim.name"] == "sgd" and p["optim.lr"] == "0.01" and p["optim.nesterov"] == "true"
        init = load(p["model.init_from"])
        assert init.me_spec["arch"] == "convnet" and init.me_spec["kwargs"]["width"] == 4
    for c in gen_runs:
        used = c.data.params["meta.train_teachers"] + c.data.params["meta.val_teachers"]
        assert not any(u in used for u in test_uris)
        assert c.data.params["scaling.num_workers"] == "2"  # meta-training ran as 2-worker DDP
        assert c.info.status == "FINISHED"

    # the generator is registered and loads without unpickling
    versions = client.search_model_versions("name='weightformer.digits.convnet'")
    wf_run = next(c for c in gen_runs if c.data.params["model.name"] == "weightformer")
    mine = [v for v in versions if v.run_id == wf_run.info.run_id]
    assert len(mine) == 1
    gen = load(f"models:/weightformer.digits.convnet/{mine[0].version}")
    assert gen.student_spec["arch"] == "convnet" and gen.student_spec["kwargs"]["width"] == 4
    # seen vs unseen teachers x subset vs val images, logged by the engine every epoch
    diag = {f"{a}_{b}_{c}" for a in ("seen", "unseen") for b in ("subset", "val") for c in ("kd", "acc")}
    assert diag <= set(wf_run.data.metrics)
    hist = client.get_metric_history(wf_run.info.run_id, "unseen_val_acc")
    assert [h.step for h in hist] == list(range(1, int(wf_run.data.params["train.epochs"]) + 1))
    assert all(0.0 < h.value <= 1.0 for h in hist)

    # using it: jobs/generate.py on the two held-out teachers (zoo versions), registered as a student
    test_versions = [t["version"] for t in teachers if t["side"] == "test"]
    gen_uri = f"models:/weightformer.digits.convnet/{mine[0].version}"
    env_g = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "jobs/generate.py", "--generator", gen_uri, "--teachers",
                           *map(str, test_versions)], cwd=REPO_ROOT, env=env_g, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generated student: test ACC" in proc.stdout and "to the nearest teacher" in proc.stdout
    assert "registered as student.digits.convnet.weightformer version" in proc.stdout, proc.stdout
    students = client.search_model_versions("name='student.digits.convnet.weightformer'")
    made = [v for v in students if v.tags.get("generator") == gen_uri]
    assert len(made) == 1
    # the same command again: the same run and version, nothing new registered
    from conftest import run_script

    again = run_script(["jobs/generate.py", "--generator", gen_uri, "--teachers", *map(str, test_versions)],
                       {"MLFLOW_TRACKING_URI": mlflow_uri})
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"version {made[0].version} (MLflow run {made[0].run_id}; the same generator and teachers were " \
           "registered before" in again.stdout, again.stdout
    assert len(client.search_model_versions("name='student.digits.convnet.weightformer'")) == len(students)
    assert made[0].tags["teachers"] == ",".join(f"models:/teacher.digits.convnet/{v}" for v in test_versions)
    student = load(f"models:/student.digits.convnet.weightformer/{made[0].version}")
    assert student.me_spec["kwargs"]["width"] == 4
    # bad input: one clear line, nothing registered (in this process: it fails before any
    # work, and the fresh-process path of the script is the run above)
    proc = run_script(["jobs/generate.py", "--generator", gen_uri, "--teachers", str(test_versions[0])],
                      {"MLFLOW_TRACKING_URI": mlflow_uri})
    assert proc.returncode == 2 and "this generator takes 2..8 teachers; got 1" in proc.stderr, proc.stderr[-2000:]
    assert len(client.search_model_versions("name='student.digits.convnet.weightformer'")) == len(students)


def _job(args, mlflow_uri, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    return subprocess.run(JOB + args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["meta.ensemble_size=9"], "meta.ensemble_size=9 exceeds the generator's max_teachers=8; valid ensemble sizes: 2..8"),
    (["meta.zoo_size=18"], "meta.zoo_size=18 leaves 2 meta-train teachers"),
    (["meta.num_train_teachers=49"], "meta.num_train_teachers=49 exceeds the 48 meta-train teachers meta.zoo_size=64 "
                                     "leaves after 8 val + 8 test; valid: 0 (all of them) or 1..48"),
    (["meta.zoo_size=22"], "leaves 6 meta-train teachers after 8 val + 8 test; meta.train_k=[2, 8] needs at least 8"),
    (["scaling.num_workers=2", "data.batch_size=128"],
     "data.batch_size=128 exceeds each worker's share of the training subset"),
    (["model.kwargs.student_kwargs={width: 8}"], "teachers must have the student's architecture"),
    (["data.val_fraction=0.1"], "set data.val_fraction/test_fraction/split_seed to the teachers' values"),
    (["model.kwargs.max_teachers=4", "meta.train_k=[2, 4]"],
     "meta.report_k=[2, 3, 4, 5, 6, 7, 8] asks for K=[5, 6, 7, 8], which this generator cannot take (it takes 2..4)"),
    (["meta.ensemble_size=2", "meta.train_k=[]", "model.name=mlp_generator",
      "model.kwargs={student: convnet, ensemble_size: 3}"],
     "the MLP generator takes exactly model.kwargs.ensemble_size=3 teachers, but meta.ensemble_size=2"),
])
def test_bad_input_is_one_clear_error_before_any_work(args, message, mlflow_uri, tmp_path):
    from conftest import run_script
    from mlflow.tracking import MlflowClient

    experiment = f"test/bad-{uuid.uuid4().hex[:6]}"
    # in this process (the zoo test below runs the job in a fresh one)
    proc = run_script([*JOB[1:], f"storage_path={tmp_path / 'ray'}", f"experiment={experiment}", *args],
                      {"MLFLOW_TRACKING_URI": mlflow_uri})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert MlflowClient(mlflow_uri).get_experiment_by_name(experiment) is None
    assert not (tmp_path / "ray").exists()


def test_a_zoo_with_fewer_teachers_than_needed_is_refused_without_training(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    experiment = f"test/zoo-{uuid.uuid4().hex[:6]}"
    proc = _job(["--no-train-zoo", *_tiny(tmp_path, experiment, 9_000_000)], mlflow_uri, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "has 0 teachers of this recipe, meta.zoo_size=6 needed (K=2)" in proc.stderr
    assert MlflowClient(mlflow_uri).get_experiment_by_name(experiment) is None
