import pytest
import yaml

from metaensemble.config import Config, parse_overrides, save_config
from metaensemble.errors import ConfigError
from metaensemble.validation import load_config


def test_yaml_and_overrides_resolve_with_types():
    cfg = load_config("configs/teachers/digits.yaml", ["optim.lr=1e-3", "train.amp=true", "model.kwargs.width=24"])
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.train.amp is True
    assert cfg.model.kwargs == {"width": 24}
    assert cfg.data.name == "digits" and cfg.experiment_name == "digits/teachers"


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'.*valid keys here:.*\blr\b"):
        load_config(None, ["optim.learning_rate=0.1"])


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epochz'.*epochs"):
        load_config(p)


def test_wrong_type_and_range_are_errors():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=zero"])
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr=-1"])


def test_unknown_registry_names_list_known_ones():
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnist'; known datasets: .*digits"):
        load_config(None, ["data.name=mnist"])
    with pytest.raises(ConfigError, match=r"unknown model 'vgg99'; known models: .*resnet18"):
        load_config(None, ["model.name=vgg99"])
    with pytest.raises(ConfigError, match=r"unknown method 'magic'"):
        load_config(None, ["method=magic"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.yaml")


def test_saved_config_round_trips_and_hash_tracks_content(tmp_path):
    cfg = load_config("configs/teachers/digits.yaml", ["seed=3"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = Config.model_validate(yaml.safe_load((tmp_path / "resolved.yaml").read_text()))
    assert again == cfg
    assert again.config_hash() == cfg.config_hash()
    assert cfg.with_overrides({"seed": 4}).config_hash() == cfg.config_hash()  # seed excluded
    assert cfg.with_overrides({"optim.lr": 0.2}).config_hash() != cfg.config_hash()
    assert cfg.with_overrides({"seed": 4}).run_key() != cfg.run_key()


def test_every_shipped_config_is_valid():
    from pathlib import Path

    from metaensemble.config import REPO_ROOT

    files = sorted((REPO_ROOT / "configs").rglob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        cfg = load_config(f)
        assert cfg.run_key().startswith(cfg.task), f
    assert Path(REPO_ROOT / "cluster.yaml").is_file()


def test_assigning_an_unknown_key_or_a_bad_section_stores_nothing():
    from metaensemble.config import build_config
    from metaensemble.methods.weightformer.config import MetaConfig

    cfg = build_config({"method": "weightformer"})
    before = cfg.config_hash()
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        cfg.bogus = 1
    with pytest.raises(ConfigError, match="meta.bogus"):
        cfg.meta = {"bogus": 3}
    assert "bogus" not in cfg.to_dict() and isinstance(cfg.meta, MetaConfig)
    assert cfg.config_hash() == before
    cfg.meta = {"ensemble_size": 3}
    assert isinstance(cfg.meta, MetaConfig) and cfg.meta.ensemble_size == 3


def test_elastic_num_workers_is_min_max_and_needs_retries(tmp_path):
    from metaensemble.engine.trainer import scaling_config

    cfg = load_config(None, ["scaling.num_workers=[1, 3]", "scaling.max_failures=2", "scaling.elastic_resize_s=5"])
    assert (cfg.scaling.min_workers, cfg.scaling.num_workers) == (1, 3)
    sc = scaling_config(cfg)
    assert sc.num_workers == (1, 3) and sc.elasticity_enabled and sc.elastic_resize_monitor_interval_s == 5
    assert scaling_config(load_config(None, ["scaling.num_workers=2"])).num_workers == 2
    with pytest.raises(ConfigError, match=r"is elastic: it resumes after a failure, so it needs scaling.max_failures"):
        load_config(None, ["scaling.num_workers=[1, 2]"])
    fixed = load_config(None, ["scaling.num_workers=[1, 3]", "scaling.max_failures=2"]).to_dict()
    path = tmp_path / "elastic.yaml"
    path.write_text(yaml.safe_dump(fixed))
    assert load_config(path).scaling.min_workers == 1
    assert load_config(path, ["scaling.num_workers=2"]).scaling.min_workers is None, "an int override is fixed"
    assert load_config(None, ["scaling.num_workers=[2, 2]"]).scaling.num_workers == 2  # not elastic: no retries needed
    with pytest.raises(ConfigError, match="min must be <= max"):
        load_config(None, ["scaling.num_workers=[3, 2]", "scaling.max_failures=1"])
    with pytest.raises(ConfigError, match=r"an int or \[min, max\]"):
        load_config(None, ["scaling.num_workers=[1, 2, 3]", "scaling.max_failures=1"])


def test_a_job_run_from_rays_working_dir_copy_keeps_its_outputs_out_of_it(monkeypatch, tmp_path):
    """Ray deletes a job's working directory after the job: runs, checkpoints and the
    MLflow store must go elsewhere, said before any work."""
    from metaensemble import config, tracking

    monkeypatch.setattr(config, "REPO_ROOT", tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("METAENSEMBLE_MLFLOW_HOME", raising=False)
    from metaensemble.engine.trainer import validate

    with pytest.raises(ConfigError, match=r"storage_path='runs/ray' is relative.*Ray deletes after the job"):
        validate(load_config(None))
    assert load_config(None, [f"storage_path={tmp_path}"]).resolved_storage_path() == str(tmp_path)
    assert load_config(None, ["storage_path=s3://bucket/ray"]).resolved_storage_path() == "s3://bucket/ray"
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI is not set"):
        tracking.ensure_tracking()


def test_a_config_can_start_from_a_base_file(tmp_path):
    """``base:`` reads another file first and lays this one's keys over it, section by
    section; the shipped derived configs equal their base plus their own keys."""
    (tmp_path / "a.yaml").write_text("optim: {lr: 0.5, momentum: 0.8}\ntrain: {epochs: 4}\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\noptim: {{lr: 0.1}}\n")
    cfg = load_config(tmp_path / "b.yaml", ["train.epochs=7"])
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.train.epochs) == (0.1, 0.8, 7)
    main, board = load_config("configs/meta/digits.yaml"), load_config("configs/compare/digits.yaml")
    assert board.run_key() == main.run_key()  # the leaderboard reuses the main job's runs
    indep = load_config("configs/teachers/digits_meta_indep.yaml")
    assert indep.model.init_seed is None and load_config("configs/teachers/digits_meta.yaml").model.init_seed == 0
    assert indep.to_dict() | {"model": None} == load_config("configs/teachers/digits_meta.yaml").to_dict() | {"model": None}


@pytest.mark.parametrize("text, words", [
    ("base: {here}\n", "comes back to it"),
    ("base: nowhere/x.yaml\n", "config file not found"),
    ("base: [1]\n", "base must be a path"),
])
def test_a_bad_base_is_one_clear_error(tmp_path, text, words):
    p = tmp_path / "c.yaml"
    p.write_text(text.format(here=p))
    with pytest.raises(ConfigError, match=words):
        load_config(p)


def test_a_key_the_dataset_does_not_read_is_refused():
    """data.root on a built-in dataset would change the run identity (a silent retrain)
    without changing the data: one line naming the datasets that read it."""
    with pytest.raises(ConfigError, match=r"data.root=/nowhere: dataset 'digits' is built in and reads no files.*"
                                          r"cifar10, cifar100, imagefolder, parquet"):
        load_config("configs/distill/digits.yaml", ["data.root=/nowhere"])
    with pytest.raises(ConfigError, match="dataset 'synthetic'"):
        load_config(None, ["data.name=synthetic", "data.root=/x"])
    # another method's section is not part of this run's identity
    base = load_config("configs/distill/digits.yaml")
    assert load_config("configs/distill/digits.yaml", ["fusion.act_samples=7"]).run_key() == base.run_key()


def test_the_streamed_shuffle_buffer_is_four_batches_unless_set_and_names_only_streamed_runs():
    from metaensemble.config import DataConfig, build_config

    assert DataConfig().train_shuffle_buffer() == 4 * 64 and DataConfig(batch_size=32).train_shuffle_buffer() == 128
    assert DataConfig(shuffle_buffer=0).train_shuffle_buffer() == 0  # file order only
    key = lambda **data: build_config({"data": data}).run_key()  # noqa: E731
    # streamed: the buffer it trains with names the run (default = its value set explicitly)
    pq = {"name": "parquet", "root": "/shards"}
    assert key(**pq) == key(**pq, shuffle_buffer=256) != key(**pq, shuffle_buffer=2000)
    assert key(**pq, batch_size=32) != key(**pq, batch_size=32, shuffle_buffer=256)
    # the old default (2000 rows, which named nothing) keeps the hash its runs had (computed
    # at b1948ab, where the buffer defaulted to 2000), and the digits default its own
    assert build_config({"data": {**pq, "shuffle_buffer": 2000}}).config_hash() == "3c638aa2458b"
    assert build_config({}).config_hash() == "7907d4e05d15"
    # in memory there is no buffer: setting one changes nothing, so it names nothing
    assert key() == key(shuffle_buffer=2000) == key(shuffle_buffer=0)
