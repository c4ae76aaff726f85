"""The soup-regime zoo recipe (``zoo.soup``): validated before any work, its parents and
children built deterministically, parents kept out of the zoo's teachers. The zoo job
itself (Ray, MLflow) is exercised in tests/tracking/test_zoo.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from metaensemble.config import resolve_path
from metaensemble.errors import ConfigError
from metaensemble.teachers import child_config, parent_configs, parent_run_of
from metaensemble.tracking import TeacherZoo
from metaensemble.validation import load_config

SOUP = "configs/teachers/digits_soup.yaml"


def test_children_start_from_their_parent_with_the_grid_expanded_deterministically():
    cfg = load_config(SOUP, ["zoo.soup.parents=2"])
    soup = cfg.zoo.soup
    parents = parent_configs(cfg)
    assert [p.seed for p in parents] == [0, 1]
    for p in parents:  # from scratch, the recipe's own training, no soup section left
        assert p.model.init_from is None and p.zoo.soup is None
        assert p.train.epochs == cfg.train.epochs and p.model.init_seed == cfg.model.init_seed
    uris = ["runs:/aaa/model", "runs:/bbb/model"]
    combos = soup.combinations()
    assert len(combos) == 16 and len({tuple(sorted(c.items())) for c in combos}) == 16
    children = [child_config(cfg, s, uris) for s in range(32)]
    for i, c in enumerate(children):
        assert c.seed == i and c.zoo.soup is None
        assert c.model.init_from == uris[i % 2] and parent_run_of(c) == ["aaa", "bbb"][i % 2]
        assert c.train.epochs == soup.child["train"]["epochs"] and c.optim.warmup_epochs == 0
        combo = combos[(i // 2) % 16]
        assert (c.optim.lr, c.train.label_smoothing, c.data.cutout, c.data.train_fraction) == (
            combo["optim.lr"], combo["train.label_smoothing"], combo["data.cutout"], combo["data.train_fraction"])
        # each child draws its own training subset; the split itself is the recipe's
        assert c.data.subset_seed == (i if c.data.train_fraction < 1.0 else None)
        assert (c.data.val_fraction, c.data.test_fraction, c.data.split_seed) == (
            cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
        assert c.model.kwargs == cfg.model.kwargs
    for p in range(2):  # every parent's children cover the whole grid
        got = {(c.optim.lr, c.train.label_smoothing, c.data.cutout, c.data.train_fraction) for c in children[p::2]}
        assert len(got) == 16
    # the same recipe gives the same children, and growing the zoo changes none of them
    grown = load_config(SOUP, ["zoo.soup.parents=2", "zoo.num_teachers=200"])
    assert [child_config(grown, s, uris).run_key() for s in range(32)] == [c.run_key() for c in children]
    assert len({c.run_key() for c in children}) == 32


def test_neither_the_grid_order_nor_dotted_keys_change_the_recipe(tmp_path):
    text = resolve_path(SOUP).read_text()
    swapped = text.replace("      optim: {lr: [0.03, 0.1]}\n      train: {label_smoothing: [0.0, 0.1]}\n"
                           "      data: {cutout: [0, 2], train_fraction: [1.0, 0.8]}",
                           "      data: {train_fraction: [1.0, 0.8], cutout: [0, 2]}\n"
                           "      train: {label_smoothing: [0.0, 0.1]}\n      optim: {lr: [0.03, 0.1]}")
    assert swapped != text
    (tmp_path / "s.yaml").write_text(swapped)
    dotted = text.replace("      optim: {warmup_epochs: 0}\n      train: {epochs: 5}",
                          "      optim.warmup_epochs: 0\n      train.epochs: 5")
    assert dotted != text
    (tmp_path / "d.yaml").write_text(dotted)
    a, b, c = load_config(SOUP), load_config(tmp_path / "s.yaml"), load_config(tmp_path / "d.yaml")
    assert a.config_hash() == b.config_hash() == c.config_hash()  # nested or dotted keys: one recipe
    keys = [[child_config(x, s, ["p"]).run_key() for s in range(8)] for x in (a, b, c)]
    assert keys[0] == keys[1] == keys[2]


def test_the_soup_section_names_the_recipe():
    cfg = load_config(SOUP)
    other = cfg.with_overrides({"zoo.soup.child.train.epochs": 6})
    assert other.config_hash() != cfg.config_hash()  # a changed child recipe is another zoo
    plain = cfg.with_overrides({"zoo.soup": None})
    assert plain.config_hash() == parent_configs(cfg)[0].config_hash()  # the parent is the recipe from scratch
    assert plain.config_hash() != cfg.config_hash()
    # the other zoo settings name nothing, as before
    assert cfg.with_overrides({"zoo.num_teachers": 8, "zoo.pack_size": 1}).config_hash() == cfg.config_hash()
    assert plain.with_overrides({"data.subset_seed": 3}).config_hash() != plain.config_hash()


@pytest.mark.parametrize("override,message", [
    ("zoo.soup.grid.model={kwargs: {width: [4, 8]}}", r"zoo.soup.grid may not set model.kwargs.width \(the zoo fixes"),
    ("zoo.soup.parent={data: {val_fraction: 0.2}}", r"zoo.soup.parent may not set data.val_fraction"),
    ("zoo.soup.child.optim={warmup_epochs: 0, momentum: 0.9}", None),  # accepted
    ("zoo.soup.grid.train.label_smoothing=[]", r"zoo.soup.grid.train.label_smoothing must be a non-empty list"),
    ("zoo.soup.grid.train.label_smoothing=0.1", r"must be a non-empty list of values, got 0.1"),
    ("zoo.soup.child.optim.lr=0.01", r"zoo.soup.child and zoo.soup.grid both set optim.lr"),
    ("zoo.soup.child.optim.momentum=-1", r"^invalid config: zoo.soup.child does not give a valid run: optim.momentum: "),
    ("zoo.soup.child.optim.lrr=1", r"zoo.soup.child does not give a valid run: unknown config key 'optim.lrr'"),
    ("zoo.soup.grid.data.train_fraction=[1.0, 1.5]",
     r"zoo.soup.grid's combination \{.*'data.train_fraction': 1.5.*\} does not give a valid run: data.train_fraction"),
    ("zoo.soup.grid.data.subset_seed=[1, 2]", r"zoo.soup.grid may not set data.subset_seed"),
    ("zoo.soup.child.model={init_seed: 3}", r"zoo.soup.child may not set model.init_seed"),
    ("zoo.soup.parents=0", r"zoo.soup.parents: Input should be greater than or equal to 1"),
    ("zoo.soup.parentz=2", r"unknown config key 'zoo.soup.parentz'"),
])
def test_a_bad_soup_recipe_is_one_clear_error(override, message):
    if message is None:
        load_config(SOUP, [override])
        return
    with pytest.raises(ConfigError, match=message) as e:
        load_config(SOUP, [override])
    assert "\n" not in str(e.value)


def test_parents_are_not_the_zoos_teachers_and_children_name_their_parent():
    def version(v, seed, **tags):
        return SimpleNamespace(version=str(v), status="READY", run_id=f"run{v}", source=f"src{v}",
                               tags={"seed": str(seed), "config_hash": tags.pop("h", "kid"), **tags})

    versions = [version(1, 0, h="par", role="parent"), version(2, 0, soup_parent="run1"),
                version(3, 1, soup_parent="run1"), version(4, 0, h="old")]
    zoo = TeacherZoo.__new__(TeacherZoo)
    zoo.name, zoo.client = "teacher.digits.convnet", SimpleNamespace(
        get_registered_model=lambda name: None, search_model_versions=lambda q: versions)
    kids = zoo.teachers("kid")
    assert [(e.seed, e.version, e.role, e.parent) for e in kids] == [(0, 2, "teacher", "run1"), (1, 3, "teacher", "run1")]
    assert [e.version for e in zoo.teachers()] == [4, 3]  # seed 0's newest teacher; never the parent
    assert [(e.version, e.role) for e in zoo.teachers(role="parent")] == [(1, "parent")]
    assert zoo.teachers("par") == []  # a parent's recipe hash finds no teacher
    table = zoo.table("kid")
    assert "(parent run1)" in table and "parents (role=parent, not teachers): 1" in table


def test_a_plain_zoo_has_no_parents():
    cfg = load_config("configs/teachers/digits_meta.yaml")
    assert cfg.zoo.soup is None
    with pytest.raises(ValueError, match="no zoo.soup section"):
        parent_configs(cfg)
    assert parent_run_of(cfg) == "" and parent_run_of(cfg.with_overrides({"model.init_from": "/some/folder"})) == ""
