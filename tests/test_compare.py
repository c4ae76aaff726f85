"""jobs/compare.py end to end on a tiny zoo (the session's Ray instance and MLflow server):
every row on the same held-out ensembles, each network the one its own method makes,
the leaderboard in MLflow as a table, plots and one child run per row; bad input refused
before any work."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import run_script
from test_meta_train import _register_zoo, _tiny

from metaensemble import data, tracking
from metaensemble.leaderboard import COLUMNS, LABELS, ensembles_of, flops_of
from metaensemble.methods.compare.config import ROWS
from metaensemble.methods.weightformer import experiment as wf_experiment
from metaensemble.validation import load_config

TINY = ["compare.ensembles=2", "compare.distill_epochs=1", "meta.finetune_epochs=1", "fusion.act_samples=50",
        "meta.zoo_size=7", "meta.num_test_teachers=3",  # two distinct held-out ensembles of K=2
        "scaling.num_workers=1",  # one worker per run: the DDP path is the main job's test
        "scaling.cpus_per_worker=2", "scaling.torch_threads=1"]  # one run fits at a time: every trained row in one pack


def _one_run_at_a_time(tmp: Path) -> None:
    """The distillation rows train with the zoo's recipe: give it TINY's scaling, so that
    they and the generator share one scaling section and train as one pack."""
    recipe = tmp / "teachers.yaml"
    text = recipe.read_text()
    assert "  cpus_per_worker: 0.5\n" in text
    recipe.write_text(text.replace("  cpus_per_worker: 0.5\n", "  cpus_per_worker: 2\n  torch_threads: 1\n"))


@pytest.fixture(scope="module")
def job(ray_local, mlflow_uri, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    experiment = f"test/compare-{uuid.uuid4().hex[:6]}"
    seed0 = 3000 + int(uuid.uuid4().int % 10_000) * 10  # this module's own zoo
    args = [*_tiny(tmp, experiment, seed0), *TINY]
    _one_run_at_a_time(tmp)  # before the zoo: the recipe's hash names its teachers
    _register_zoo(tmp, args, mlflow_uri)
    res = run_script(["jobs/compare.py", *args], env={"MLFLOW_TRACKING_URI": mlflow_uri})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    cfg = load_config("configs/compare/digits.yaml", args)
    client = tracking.client(mlflow_uri)
    exp_id = tracking.experiment_id(client, cfg.experiment_name)
    parent = next(r for r in client.search_runs([exp_id], "tags.`metaensemble.job` = 'compare'"))
    board = json.loads(Path(client.download_artifacts(parent.info.run_id, "leaderboard.json", str(tmp)))
                       .read_text())["rows"]
    return cfg, res, client, exp_id, parent, {r["key"]: r for r in board}, tmp, args


def test_every_row_is_on_the_board_with_intervals_and_costs(job):
    cfg, res, _client, _exp, _parent, board, _tmp, _args = job
    assert list(board) == [k for k in LABELS if k == "ensemble" or any(k in rows for rows in ROWS.values())]
    for k, r in board.items():
        assert r["n"] == 2, k
        for c in (*COLUMNS, "time_s"):
            v = r[c]
            assert len(v["per_ensemble"]) == 2 and v["mean"] == pytest.approx(sum(v["per_ensemble"]) / 2)
            assert v["lo"] <= v["mean"] <= v["hi"], (k, c)
        assert 0.0 < r["acc"]["mean"] <= 1.0 and r["nll"]["mean"] > 0 and r["params"] > 0 and r["flops"] > 0
        assert ("acc_minus_kd" in r) == (k != "kd")
        if k != "kd":  # paired against KD, ensemble by ensemble
            diffs = [a - b for a, b in zip(r["acc"]["per_ensemble"], board["kd"]["acc"]["per_ensemble"], strict=True)]
            assert r["acc_minus_kd"]["mean"] == pytest.approx(sum(diffs) / 2)
        # only the generator's rows carry a one-off cost (meta-training), amortised over 2 ensembles
        assert (r["one_off_s"] > 0) == k.startswith("weightformer"), k
        assert r["amortised_s"] == pytest.approx(r["time_s"]["mean"] + r["one_off_s"] / 2)
        # OT fusion aligns its teachers itself; on this zoo (meta.align=none) nothing else does
        assert r["aligned"] == k.startswith("fusion"), k
    # one network each, except the reference: K = 2 networks at inference
    member = board["best_member"]
    assert board["ensemble"]["params"] == 2 * member["params"] and board["ensemble"]["flops"] == 2 * member["flops"]
    assert board["ensemble"]["time_s"]["mean"] == 0.0
    for k in ("uniform_soup", "greedy_soup", "learned_soup", "fusion", "kd", "latentbe", "tdiv_sdiv", "weightformer"):
        assert board[k]["params"] == member["params"] and board[k]["time_s"]["mean"] > 0, k
    printed = res.stdout
    for label in (LABELS[k] for k in board):
        assert f"| {label} |" in printed
    assert "held-out ensembles of K=2" in printed and "wall time" in printed


def test_mlflow_holds_the_board_its_plots_and_one_child_run_per_row(job):
    cfg, _res, client, exp_id, parent, board, _tmp, _args = job
    assert parent.info.status == "FINISHED"
    # one run fits at a time here: the rows of four methods (the generator and three
    # distillers on each of 2 ensembles) trained as one pack, one Ray Train run and no Tune
    # trial, and the finetunes as a second pack (train_configs' Tune path, with its trials'
    # params: tests/test_meta_train.py)
    trained = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                           "and tags.`metaensemble.ray_run` != ''")
    packs = Counter(r.data.tags["metaensemble.ray_run"] for r in trained)
    board_pack = [k for k in packs if k.startswith("pack-meta_train-weightformer-")]
    assert len(board_pack) == 1 and packs[board_pack[0]] == 1 + 3 * 2, packs
    assert len(packs) == 2 and all(k.startswith("pack-") for k in packs), packs
    assert not list(Path(cfg.resolved_storage_path()).glob("compare/*/*/params.json"))
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.md", "leaderboard.json", "pareto.png", "reliability.png", "leaderboard_table.json"} <= names
    rows = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                        "and tags.`metaensemble.compare_row` != ''")
    assert sorted(r.data.tags["metaensemble.compare_row"] for r in rows) == sorted(board)
    for r in rows:  # the same metric names for every row: MLflow's compare view lines them up
        key = r.data.tags["metaensemble.compare_row"]
        assert {*COLUMNS, "time_s", "params", "flops", "amortised_s", "acc_minus_kd", "acc_lo", "acc_hi",
                "best_in"} <= set(r.data.metrics), key
        assert r.data.tags["metaensemble.invocation"]  # Ctrl-C marks it KILLED like every run the job opens
        assert r.data.metrics["acc"] == pytest.approx(board[key]["acc"]["mean"])
        assert r.info.status == "FINISHED"


def test_every_method_saw_the_same_teachers_and_trained_what_its_own_job_trains(job):
    cfg, _res, client, exp_id, parent, board, _tmp, _args = job
    from metaensemble.methods.weightformer.plan import plan

    p = plan(cfg, train_missing=False)
    ensembles = [[p.cfg.meta.test_teachers[j] for j in ens] for ens in ensembles_of(p.cfg)]
    # the WeightFormer job's own first two held-out ensembles
    assert ensembles_of(p.cfg) == wf_experiment.test_ensembles(p.cfg)[:2]
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_method: dict[str, list] = {}
    for c in children:
        if "distill.teachers" in c.data.params:
            by_method.setdefault((c.data.params["method"], c.data.params["task"]), []).append(
                json.loads(c.data.params["distill.teachers"]))
    # KD, LatentBE, TDiv-SDiv and both finetunes: one run per ensemble, on exactly its teachers
    for key in (("kd", "kd"), ("latentbe", "kd"), ("tdiv_sdiv", "kd")):
        assert sorted(by_method[key]) == sorted(ensembles), key
    assert sorted(by_method[("kd", "kd_finetune")]) == sorted(ensembles * 2)  # fusion's and WeightFormer's
    # KD here is the WeightFormer job's own KD baseline: the same config, so the same run
    kd_job = wf_experiment.kd_configs(p)
    from metaensemble.leaderboard import distill_configs

    ours = distill_configs(p, ["kd"], ensembles_of(p.cfg))
    shared = [k.split("/")[1] for k in kd_job if k.startswith("kd_full/")]
    assert shared  # meta.kd_ensembles=1: the job's KD baseline covers the first ensemble
    for i in shared:
        assert ours[f"kd/{i}"].run_key() == kd_job[f"kd_full/{i}"].with_overrides(
            {"train.epochs": cfg.compare.distill_epochs}).run_key()


def test_the_rows_made_here_are_the_networks_their_own_code_makes(job):
    """The soups and the fusion, remade outside the job from the same teachers, score
    what the board says for the first ensemble (same weights: the same predictions)."""
    cfg, _res, _client, _exp, _parent, board, _tmp, _args = job
    from metaensemble import metrics
    from metaensemble.evaluation import calibrated_columns
    from metaensemble.methods import soups
    from metaensemble.methods.base import predict_logp
    from metaensemble.methods.fusion.pipeline import fuse_parents
    from metaensemble.methods.weightformer.plan import plan
    from metaensemble.methods.weightformer.use import eval_data
    from metaensemble.models import load
    from metaensemble.models.batchnorm import recompute_bn

    p = plan(cfg, train_missing=False)
    ev = eval_data(p.cfg)
    full = data.load(p.cfg.data.model_copy(update={"train_fraction": 1.0}))
    ensembles = ensembles_of(p.cfg)
    assert len({frozenset(e) for e in ensembles}) == 2  # two different teacher sets: a swap would show
    for i, ens in enumerate(ensembles):
        uris = [p.cfg.meta.test_teachers[j] for j in ens]
        teachers = [load(u).eval() for u in uris]
        states = [t.state_dict() for t in teachers]

        def check(key, net, i=i):  # NLL is continuous in the weights: a different network shows
            got = calibrated_columns(predict_logp(net, ev.val), predict_logp(net, ev.test))
            for c in ("acc", "nll"):
                assert got[c] == pytest.approx(board[key][c]["per_ensemble"][i], rel=1e-5), (key, i, c)

        check("greedy_soup", soups.greedy_soup(states, load(uris[0]), ev.bn, ev.val).model)
        check("uniform_soup", soups.uniform_soup(states, load(uris[0]), ev.bn, ev.val).model)
        fused = fuse_parents(teachers, p.cfg.fusion, full.train, full.info, weights=[0.5, 0.5]).model
        check("fusion", recompute_bn(fused, ev.bn))
        # the reference row: the teachers' averaged probabilities (each with BN recomputed)
        scored = [predict_logp(recompute_bn(load(u), ev.bn), ev.test) for u in uris]
        avg = metrics.ensemble_logp(torch.stack([lp for lp, _ in scored]))
        acc = float((avg.argmax(1) == scored[0][1]).float().mean())
        assert acc == pytest.approx(board["ensemble"]["acc"]["per_ensemble"][i], abs=1e-6)
    assert board["ensemble"]["flops"] == sum(flops_of(t, next(iter(ev.test))["x"]) for t in teachers)


@pytest.mark.parametrize("override, words", [
    ("methods=[kd,soup]", ["unknown method(s) 'soup'", "known: best_member"]),
    ("meta.ensemble_size=4", ["meta.ensemble_size=4 is more than the 3 held-out"]),
    ("compare.ensembles=5", ["compare.ensembles=5", "form only 3 distinct ensembles of K=2"]),
    ("model.kwargs.student=wrn", ["method fusion cannot take the zoo's architecture 'wrn'"]),
])
def test_bad_input_is_refused_before_any_work(tmp_path, override, words):
    args = [*_tiny(tmp_path, f"test/compare-bad-{uuid.uuid4().hex[:6]}", 1), *TINY, override]
    res = run_script(["jobs/compare.py", *args], env={"MLFLOW_TRACKING_URI": f"file:{tmp_path / 'never'}"})
    assert res.returncode == 2, res.stderr[-2000:]
    for w in words:
        assert w in res.stderr, res.stderr
    assert not (tmp_path / "never").exists() and not (tmp_path / "ray").exists()


def test_the_best_network_of_each_ensemble_is_registered(job):
    """Per ensemble, the single network with the highest val accuracy (never test) is a
    registered version tagged with its row and teachers, and it is the network scored."""
    cfg, res, client, _exp, parent, board, _tmp, _args = job
    from metaensemble.methods.base import predict_logp
    from metaensemble.methods.weightformer.plan import plan
    from metaensemble.methods.weightformer.use import eval_data
    from metaensemble.models import load

    p = plan(cfg, train_missing=False)
    singles = [k for k in board if k != "ensemble"]
    assert sum(board[k]["best_in"] for k in singles) == 2
    name = "student.digits.convnet.compare_best"
    versions = {v.source.rstrip("/").split("/")[-1]: v for v in client.search_model_versions(f"name='{name}'")
                if v.run_id == parent.info.run_id}
    assert sorted(versions) == ["0", "1"]
    ev = eval_data(p.cfg)
    for i, ens in enumerate(ensembles_of(p.cfg)):
        v = versions[str(i)]
        top = max(board[k]["val_acc"]["per_ensemble"][i] for k in singles)
        assert board[v.tags["method"]]["val_acc"]["per_ensemble"][i] == top
        assert v.tags["teachers"] == ",".join(p.cfg.meta.test_teachers[j] for j in ens)
        logp, y = predict_logp(load(f"models:/{name}/{v.version}"), ev.test)
        acc = float((logp.argmax(1) == y).float().mean())
        assert acc == pytest.approx(board[v.tags["method"]]["acc"]["per_ensemble"][i], abs=1e-6)
    assert f"registered as {name} versions" in res.stdout
    # the generator it used is registered, as the main job registers it
    gens = client.search_model_versions("name='weightformer.digits.convnet'")
    used = next(v for v in gens if v.tags.get("meta_train_run") == parent.info.run_id)
    assert f"generator: weightformer.digits.convnet version {used.version}" in res.stdout


def test_teachers_are_aligned_first_where_the_config_says_so(job, mlflow_uri, tmp_path):
    """meta.align=permutation without WeightFormer on the board: the soups still take the
    teachers permuted onto the WeightFormer job's reference, say so, and pay for it."""
    cfg, _res, client, exp_id, _parent, plain, _tmp, job_args = job
    from metaensemble.evaluation import calibrated_columns
    from metaensemble.methods import soups
    from metaensemble.methods.base import predict_logp
    from metaensemble.methods.weightformer.align import align_states
    from metaensemble.methods.weightformer.plan import plan
    from metaensemble.methods.weightformer.tokens import build_layout
    from metaensemble.methods.weightformer.use import eval_data
    from metaensemble.models import load

    over = ["methods=[best_member,uniform_soup]", "meta.align=permutation"]
    args = [*job_args, *over]
    res = run_script(["jobs/compare.py", *args], env={"MLFLOW_TRACKING_URI": mlflow_uri})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    acfg = load_config("configs/compare/digits.yaml", [*args[:-2], "compare.methods=[best_member,uniform_soup]",
                                                       "meta.align=permutation"])
    parent = next(r for r in client.search_runs([exp_id], "tags.`metaensemble.job` = 'compare'",
                                                order_by=["attributes.start_time DESC"]))
    board = {r["key"]: r for r in json.loads(Path(client.download_artifacts(
        parent.info.run_id, "leaderboard.json", str(tmp_path))).read_text())["rows"]}
    assert list(board) == ["ensemble", "best_member", "uniform_soup"]
    assert board["uniform_soup"]["aligned"] and not board["best_member"]["aligned"]
    assert board["best_member"]["acc"]["per_ensemble"] == plain["best_member"]["acc"]["per_ensemble"]
    p = plan(acfg, train_missing=False)
    ev = eval_data(p.cfg)
    ref = load(p.cfg.meta.train_teachers[0])
    layout = build_layout(ref, torch.zeros(2, 1, 8, 8))
    for i, ens in enumerate(ensembles_of(p.cfg)):
        uris = [p.cfg.meta.test_teachers[j] for j in ens]
        states = align_states([load(u).state_dict() for u in uris], ref.state_dict(), layout, "permutation")
        soup = soups.uniform_soup(states, load(uris[0]), ev.bn, ev.val).model
        got = calibrated_columns(predict_logp(soup, ev.val), predict_logp(soup, ev.test))
        assert got["nll"] == pytest.approx(board["uniform_soup"]["nll"]["per_ensemble"][i], rel=1e-5)
