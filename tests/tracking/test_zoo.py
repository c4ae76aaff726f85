"""The teacher zoo: trained through the engine, registered, queried, idempotent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metaensemble import data, metrics, models, tracking
from metaensemble.teachers import missing_seeds, packs, train_zoo
from metaensemble.tracking import TeacherEntry, TeacherZoo
from metaensemble.validation import load_config


def test_zoo_trains_missing_seeds_concurrently_registers_and_skips_known(ray_local, digits_cfg):
    """Seeds 0-1 as one pack (one Ray Train run) beside seed 2 alone, as Tune trials side
    by side; every teacher its own run and registered version; then idempotent."""
    cfg = digits_cfg("zoo.num_teachers=3", "zoo.pack_size=2", "train.epochs=1", "model.name=mlp", "model.kwargs={}")
    zoo = train_zoo(cfg)
    entries = zoo.teachers()
    assert zoo.name == "teacher.digits.mlp" and [e.seed for e in entries] == [0, 1, 2]
    for e in entries:
        assert e.config_hash == cfg.config_hash() and {"val_acc", "test_acc", "test_nll", "test_ece"} <= set(e.metrics)
    c = tracking.client()
    ray_runs = [c.get_run(e.run_id).data.tags.get("metaensemble.ray_run") for e in entries]
    # seeds 0 and 1 trained in one packed Ray run, seed 2 alone in its own
    assert ray_runs[0].startswith("pack-") and ray_runs[0] == ray_runs[1]
    assert ray_runs[2].startswith("teachers-") and ray_runs[2].endswith(entries[2].run_id[:8])
    # Tune copies a trial's config into every result row it writes: the trials' configs are
    # indices into the trainable's parameters, not whole configs (a zoo's result.json was 26 MB)
    params = sorted(json.loads(f.read_text())["params"] for f in Path(cfg.storage_path).glob("zoo/*/*/params.json"))
    assert params == [0, 1]

    # A downloaded teacher is the model whose test accuracy was logged.
    teacher = zoo.load(entries[1])
    split = data.load(cfg.data)
    with torch.no_grad():
        batches = list(data.ArrayLoader(split.test, split.info, 512))
        logp = torch.cat([torch.log_softmax(teacher(b["x"]), 1) for b in batches])
        y = torch.cat([b["y"] for b in batches])
    assert metrics.accuracy(logp.exp(), y) == pytest.approx(entries[1].metrics["test_acc"], abs=1e-6)
    assert isinstance(models.load(entries[0].uri), torch.nn.Module)  # models:/ URI

    exp = c.get_experiment_by_name(cfg.experiment_name)
    n_runs = len(c.search_runs([exp.experiment_id]))
    train_zoo(cfg)  # the same command: nothing retrained
    assert len(c.search_runs([exp.experiment_id])) == n_runs
    assert [e.version for e in zoo.teachers()] == [e.version for e in entries]

    # Another recipe of the same (dataset, arch), a soup-regime one: its parent trains from
    # scratch and is registered with role=parent, then seeds 0-1 are its children,
    # fine-tuned from its weights with the grid's learning rates. They are this recipe's
    # own versions, and neither recipe displaces the other's.
    first = [e.version for e in zoo.teachers(cfg.config_hash())]
    other = cfg.with_overrides({"zoo.num_teachers": 2, "optim.lr": 0.1,
                                "zoo.soup": {"grid": {"optim.lr": [0.05, 0.02]}}})
    train_zoo(other)
    children = zoo.teachers(other.config_hash())
    (parent,) = [p for p in zoo.teachers(role="parent") if p.run_id == children[0].parent]
    assert [e.seed for e in children] == [0, 1] and {e.parent for e in children} == {parent.run_id}
    assert parent.role == "parent" and parent.run_id not in {e.run_id for e in zoo.teachers()}
    for child, lr in zip(children, (0.05, 0.02), strict=True):
        ran = load_config(c.download_artifacts(child.run_id, "config.yaml"))
        assert (ran.optim.lr, ran.model.init_from, ran.seed) == (lr, f"runs:/{parent.run_id}/model", child.seed)
    # fine-tuned for one epoch, a child stays far nearer its parent than two teachers of
    # independent initialisations are to each other
    flat = lambda e: torch.cat([v.flatten().float() for v in zoo.load(e).state_dict().values()])  # noqa: E731
    apart = (flat(entries[0]) - flat(entries[1])).norm()
    assert all((flat(e) - flat(parent)).norm() < apart / 4 for e in children)
    assert [e.version for e in zoo.teachers(cfg.config_hash())] == first
    runs_before = len(c.search_runs([exp.experiment_id]))
    assert runs_before == n_runs + 3  # the parent and its two children

    # Growing the first recipe's zoo trains seed 3 only: its seeds 0-2 still count as
    # present beside the other recipe's versions of seeds 0-1.
    grown = train_zoo(cfg.with_overrides({"zoo.num_teachers": 4}))
    assert [e.seed for e in grown.teachers(cfg.config_hash())] == [0, 1, 2, 3]
    assert [e.version for e in grown.teachers(cfg.config_hash())][:3] == first
    assert len(c.search_runs([exp.experiment_id])) == runs_before + 1


def test_zoo_of_unknown_pair_is_empty_and_require_explains(mlflow_uri):
    zoo = TeacherZoo("digits", "resnet50")
    assert zoo.teachers() == [] and not zoo.exists()
    from metaensemble.errors import ZooError

    with pytest.raises(ZooError, match=r"has 0 teachers, 4 needed.*train_teachers.py"):
        zoo.require(4)


def test_a_seed_counts_as_present_only_with_the_same_recipe():
    def entry(seed, h):
        return TeacherEntry("teacher.digits.convnet", seed + 1, seed, "run", "src", h)

    entries = [entry(0, "aaa"), entry(1, "aaa"), entry(2, "bbb")]
    assert missing_seeds(entries, [0, 1, 2, 3], "aaa") == [2, 3]
    assert missing_seeds(entries, [0, 1, 2], "bbb") == [0, 1]
    assert missing_seeds([], [5], "aaa") == [5]


def test_missing_seeds_are_packed_by_pack_size_or_evenly_over_the_runs_at_once():
    assert packs([4, 5, 6, 7, 8], 2, 3) == [[4, 5], [6, 7], [8]]
    assert packs([1, 2], 1, 2) == [[1], [2]]
    assert packs(list(range(32)), 0, 3) == [list(range(11)), list(range(11, 22)), list(range(22, 32))]
    assert packs([5, 6, 7], 0, 4) == [[5], [6], [7]]
    assert packs(list(range(7)), 0, 1) == [list(range(7))]
    assert packs([], 0, 3) == []
