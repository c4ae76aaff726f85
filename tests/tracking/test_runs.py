"""Finding-or-creating a run is atomic per run key, against the session's real server."""

from __future__ import annotations

import threading
import time

from mlflow.entities import ViewType

from metaensemble import tracking
from metaensemble.tracking import runs
from metaensemble.tracking.runs import PENDING, TAG_KEY, TAG_TICKET

N_CALLERS = 8


def _open_together(uri: str, cfg, key: str, n: int = N_CALLERS) -> list[tracking.RunHandle]:
    """``n`` threads, each with its own client, released into ``open_run`` at once."""
    barrier = threading.Barrier(n)
    handles: list = [None] * n
    errors: list = []

    def call(i: int) -> None:
        c = tracking.client(uri)
        barrier.wait()
        try:
            handles[i] = tracking.open_run(c, cfg, key)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return handles


def _key_runs(c, exp_id: str, key: str, view: int) -> list:
    return c.search_runs([exp_id], filter_string=f"tags.`{TAG_KEY}` = '{key}'", run_view_type=view)


def test_concurrent_open_run_creates_one_run(mlflow_uri, digits_cfg):
    cfg = digits_cfg()
    c = tracking.client(mlflow_uri)
    winners = {}
    for round_ in range(3):
        key = f"race-{round_}"
        handles = _open_together(mlflow_uri, cfg, key)
        winners[key] = handles[0].run_id

        assert len({h.run_id for h in handles}) == 1, "callers got different runs"
        assert sum(not h.resumed for h in handles) == 1
        exp_id = handles[0].experiment_id
        active = _key_runs(c, exp_id, key, ViewType.ACTIVE_ONLY)
        assert [r.info.run_id for r in active] == [handles[0].run_id]
        assert tracking.find_run(c, exp_id, key).info.run_id == handles[0].run_id
        # only the winner logged its config: losers never show params or a config
        artifacts = [a.path for a in c.list_artifacts(handles[0].run_id)]
        assert active[0].data.params and "config.yaml" in artifacts
        for lost in _key_runs(c, exp_id, key, ViewType.DELETED_ONLY):
            assert not lost.data.params and not c.list_artifacts(lost.info.run_id)

    again = tracking.open_run(c, cfg, "race-0")
    assert again.resumed and again.run_id == winners["race-0"]


def test_a_late_racer_loses_even_with_an_earlier_start_time(mlflow_uri, digits_cfg):
    """A creator that checked for the key before the winner existed, then stalled: its run
    lands after the winner was decided, stamped with the earlier time it was built at."""
    cfg = digits_cfg()
    c = tracking.client(mlflow_uri)
    winner = tracking.open_run(c, cfg, "late")
    start = c.get_run(winner.run_id).info.start_time
    late = c.create_run(winner.experiment_id, start_time=start - 60_000,
                        tags={TAG_KEY: "late", TAG_TICKET: PENDING})

    decided = runs.join_race(c, winner.experiment_id, "late", late.info.run_id)

    assert decided.info.run_id == winner.run_id
    assert tracking.open_run(c, cfg, "late").run_id == winner.run_id


def test_open_run_waits_for_a_racer_still_taking_its_ticket(mlflow_uri, digits_cfg):
    """Returning a run that is about to lose (and be deleted) would hand out a dead run."""
    cfg = digits_cfg()
    c = tracking.client(mlflow_uri)
    exp_id = tracking.experiment_id(c, cfg.experiment_name)
    racer = c.create_run(exp_id, tags={TAG_KEY: "slow", TAG_TICKET: PENDING})
    result: list = []
    t = threading.Thread(
        target=lambda: result.append(tracking.open_run(tracking.client(mlflow_uri), cfg, "slow")))
    t.start()
    time.sleep(2.0)
    assert t.is_alive() and not result, "open_run returned while a racer was pending"

    c.set_tag(racer.info.run_id, TAG_TICKET, "1")
    t.join(timeout=30)
    assert result and result[0].run_id == racer.info.run_id and result[0].resumed


def test_every_experiment_carries_the_runs_tables_saved_view(mlflow_uri):
    """A new experiment, and one made by someone else without the platform's tags, both end
    up tagged as model training with the saved view whose columns are the key metrics."""
    import json
    import uuid

    c = tracking.client(mlflow_uri)
    fresh = runs.experiment_id(c, f"test/view-{uuid.uuid4().hex[:8]}")
    foreign = c.create_experiment(f"test/foreign-{uuid.uuid4().hex[:8]}")
    assert runs.experiment_id(c, c.get_experiment(foreign).name) == foreign
    for exp in (fresh, foreign):
        tags = c.get_experiment(exp).tags
        assert tags[runs.TAG_EXPERIMENT_KIND] == runs.KIND_TRAINING
        assert runs.TAG_VIEW == "mlflow.sharedViewState.metaensemble"
        columns = json.loads(tags[runs.TAG_VIEW])["selectedColumns"]
        assert "metrics.`val_acc`" in columns and "metrics.`test_acc`" in columns and "params.`model.name`" in columns
        assert columns == [f"params.`{k}`" for k in runs.KEY_PARAMS] + [f"metrics.`{k}`" for k in runs.KEY_METRICS]
