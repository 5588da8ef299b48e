"""The config tree's rules: pipeline sub-sections, moved keys, stage hashes by section, one default per knob, and the
CLI's shorthand flags checked against the tree; the typed manifests and the run's one read of a dataset."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
from helpers import ROOT, planted_frame, write_dataset

from recdist import config as config_module
from recdist.config import INFER_BATCH_SIZE, MOVED_KEYS, Config, load_config, tree_default
from recdist.errors import ConfigError
from recdist.pipeline import STAGE_SECTIONS, stage_hashes


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(config_module, "_warned", set())


def test_old_flat_pipeline_keys_load_into_their_sub_section_with_one_warning(caplog):
    old = {f"pipeline.{k}": v for k, v in {"top_n": 7, "crossfit_folds": 3, "mlp_train_share": 0.5}.items()}
    with caplog.at_level(logging.WARNING, logger="recdist.config"):
        first = load_config(None, old)
        again = load_config(None, old)
    p = first.pipeline
    assert (p.outputs.top_n, p.crossfit.folds, p.train_share.fraction) == (7, 3, 0.5)
    assert again == first == load_config(
        None, {"pipeline.outputs.top_n": 7, "pipeline.crossfit.folds": 3, "pipeline.train_share.fraction": 0.5}
    )
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3  # once per key and process
    assert any("pipeline.top_n is now pipeline.outputs.top_n" in w for w in warnings)


def test_every_moved_key_names_a_key_of_the_tree():
    for old, new in MOVED_KEYS.items():
        assert old not in Config.model_fields["pipeline"].annotation.model_fields
        tree_default(f"pipeline.{new}")  # KeyError when the new place does not exist


def test_an_old_key_beside_its_new_one_is_refused():
    with pytest.raises(ConfigError, match="top_n"):
        load_config(None, {"pipeline.top_n": 5, "pipeline.outputs.top_n": 6})


def test_a_misspelt_old_key_suggests_its_new_place():
    with pytest.raises(ConfigError, match="did you mean .outputs.top_n."):
        load_config(None, {"pipeline.top_nn": 5})


def changed(**overrides) -> set[str]:
    """The stages whose hash changes with these overrides."""
    base, other = stage_hashes(Config(), "data"), stage_hashes(load_config(None, overrides), "data")
    return {name for name in base if base[name] != other[name]}


def test_stage_hashes_follow_the_sections_each_stage_reads():
    assert changed(**{"pipeline.inference.batch_size": 1024, "pipeline.inference.actors": 2}) == set()
    assert changed(**{"cluster.workers": 4}) == set()
    assert changed(**{"pipeline.outputs.top_n": 3}) == {"outputs"}
    assert changed(**{"pipeline.evaluation.ranking_k": 5}) == {"outputs"}
    everything = {"mf", "reliability", "rating", "outputs"}
    assert changed(**{"pipeline.session.future": True}) == everything
    assert changed(**{"pipeline.crossfit.folds": 2}) == everything
    assert changed(**{"pipeline.train_share.fraction": 0.5}) == everything
    assert changed(**{"stages.reliability.train.epochs": 2}) == {"reliability", "rating", "outputs"}
    assert set(STAGE_SECTIONS) == {"mf", "reliability", "rating", "single", "outputs"}


def test_the_dataset_hash_covers_synth_only_for_synthetic_ratings():
    plain = load_config(None, {"source.path": "x.csv"})
    assert plain.dataset_hash() == load_config(None, {"source.path": "x.csv", "synth.seed": 3}).dataset_hash()
    synthetic = load_config(None, {"source.dataset": "synthetic"})
    assert synthetic.dataset_hash() != load_config(
        None, {"source.dataset": "synthetic", "synth.seed": 3}
    ).dataset_hash()


def test_the_inference_batch_size_is_defined_once():
    assert Config().pipeline.inference.batch_size == INFER_BATCH_SIZE
    from recdist.infer.scored import ScoreOptions

    assert ScoreOptions().batch_size == INFER_BATCH_SIZE
    for path in (ROOT / "recdist").rglob("*.py"):
        assert "262_144" not in path.read_text() or path.name == "config.py", path


def test_cli_shorthand_flags_name_keys_of_the_tree():
    """Flags declared with cli._key are checked when cli.py is imported; the config keys written out in cli.py
    (stage flags of `train`, `pipeline`'s, `infer`'s) are checked here."""
    import typing

    from recdist import cli

    flags = {}
    for command in (cli.synth, cli.prepare, cli.pipeline):  # every flag given: all shorthands, the shared ones too
        flags |= cli._shorthands(command, dict.fromkeys(typing.get_type_hints(command), 0))
    assert {"prepare.val_fraction", "synth.n_users", "synth.popularity_skew", "synth.exposure"} <= set(flags)
    assert {"cluster.workers", "cluster.gpu", "source.path"} <= set(flags)
    text = (ROOT / "recdist" / "cli.py").read_text()
    keys = set(re.findall(r'f?"((?:\{key\}|[a-z_]+)(?:\.[a-z_]+)+)"[:)]', text)) | set(cli.SOURCE_FILES)
    assert {"cluster.workers", "source.dataset", "pipeline.inference.batch_size"} <= keys
    for key in keys:
        tree_default(key.replace("{key}", "stages.mf"))


def test_a_shorthand_flag_shows_the_trees_default(tmp_path):
    from typer.testing import CliRunner

    from recdist.cli import app

    result = CliRunner().invoke(app, ["prepare", "--help"], env={"COLUMNS": "200"})
    assert "Validation share [default: 0.1]." in result.output
    assert "Number of balanced Parquet shards [default: 8]." in result.output


def test_one_learning_rate_rule_for_training_and_the_models_table():
    from recdist.models import registry
    from recdist.train.solvers import DEFAULT_LR, SGD_LR, default_lr

    mf, autoencoder = registry.get("biased_mf").module, registry.get("autoencoder").module
    assert default_lr(mf, "auto") == default_lr(mf, "sgd") == SGD_LR
    assert default_lr(mf, "autograd") == DEFAULT_LR  # an SGD-capable model trained with autograd
    assert default_lr(mf, "als") is None
    assert default_lr(autoencoder, "auto") == autoencoder.default_lr


def test_typed_manifests_list_their_files_and_read_old_ones(tmp_path):
    from recdist.manifest import DatasetManifest, file_entries, relative, resolve

    data = write_dataset(tmp_path / "data", planted_frame(), shards=2)
    old = DatasetManifest.read(data)  # written as before typed manifests: no files, no timestamp_unit
    assert old.files == [] and old.n_ratings == planted_frame().height and old.timestamp_unit is None
    entries = {e.path: e for e in file_entries(data)}
    assert set(entries) == {"ratings/part-00000.parquet", "ratings/part-00001.parquet"}
    assert sum(e.rows or 0 for e in entries.values()) == old.n_ratings
    assert all(e.bytes > 0 for e in entries.values())
    old.files = file_entries(data)
    old.write(str(tmp_path / "copy"))
    assert json.loads((tmp_path / "copy" / "manifest.json").read_text())["files"][0]["rows"] > 0
    run = str(tmp_path / "run")
    assert relative(f"{run}/data", f"{run}/mf/scored") == "../../data"
    assert resolve("../../data", f"{run}/mf/scored") == f"{run}/data"
    assert relative("s3://b/run/data", "s3://b/run/mf/scored") == "../../data"
    assert relative("s3://other/data", "s3://b/run") == "s3://other/data"


def test_run_models_are_stored_relative_to_the_run_and_read_back_where_it_now_is(tmp_path):
    from recdist.manifest import RunModels

    run, elsewhere = str(tmp_path / "run"), str(tmp_path / "shared" / "data")
    models = RunModels(
        data=elsewhere, scored=f"{run}/rating/scored", final=f"{run}/rating/model", mf=f"{run}/mf/model",
        histories={"mf": f"{run}/mf/model"},
    )  # fmt: skip
    stored = models.relative_to(run)
    assert (stored.data, stored.scored, stored.mf, stored.reliability) == (elsewhere, "rating/scored", "mf/model", None)
    assert stored.histories == {"mf": "mf/model"}
    moved = str(tmp_path / "moved")  # a copied run resolves inside its new place; the outside dataset stays put
    back = RunModels.model_validate(json.loads(stored.model_dump_json())).resolved(moved)
    assert (back.data, back.final, back.histories["mf"]) == (elsewhere, f"{moved}/rating/model", f"{moved}/mf/model")
    on_s3 = RunModels(data="s3://b/d", scored="s3://b/run/s", final="s3://b/run/f").relative_to("s3://b/run")
    assert (on_s3.data, on_s3.scored) == ("s3://b/d", "s")


def test_a_runs_plans_come_from_one_read_of_the_dataset(tmp_path):
    from recdist.infer.plan import known_mask, plan_for, trained_on

    frame = planted_frame()
    data = write_dataset(tmp_path / "data", frame, shards=2)
    view = trained_on(data, folds=2, fold_seed=1)
    train = frame.filter(frame["split"] == "train")
    assert np.array_equal(view.known_users[0], known_mask(train["user_idx"].to_numpy(), len(view.known_users[0])))
    assert view.folds == 2 and len(view.known_items) == 3
    full = plan_for(view, str(tmp_path / "m"), "mf", fold_models=(str(tmp_path / "f0"), str(tmp_path / "f1")))
    later = plan_for(view, str(tmp_path / "r"), "reliability", fallback_model=str(tmp_path / "m"))
    assert len(full.models) == 3 and len(later.models) == len(later.known_users) == 1
    assert later.cold_error == pytest.approx(float(((train["rating"] - view.global_mean) ** 2).mean()), rel=1e-6)


@pytest.mark.s3
def test_manifest_files_and_relative_paths_on_s3(s3_bucket, tmp_path):
    from recdist import storage
    from recdist.manifest import file_entries, relative, resolve

    write_dataset(tmp_path / "data", planted_frame(), shards=2)
    for name in ("ratings/part-00000.parquet", "ratings/part-00001.parquet", "manifest.json"):
        storage.write_bytes(f"{s3_bucket}/run/data/{name}", (tmp_path / "data" / name).read_bytes())
    storage.write_bytes(f"{s3_bucket}/run/data/sub/manifest.json", b"{}")  # committed on its own: its manifest
    entries = file_entries(f"{s3_bucket}/run/data")[:2]
    assert [e.path for e in file_entries(f"{s3_bucket}/run/data")][2:] == ["sub/manifest.json"]
    assert [e.path for e in entries] == ["ratings/part-00000.parquet", "ratings/part-00001.parquet"]
    assert [e.bytes for e in entries] == [(tmp_path / "data" / e.path).stat().st_size for e in entries]
    assert sum(e.rows or 0 for e in entries) == planted_frame().height
    assert relative(f"{s3_bucket}/run/data", f"{s3_bucket}/run/mf/scored") == "../../data"
    assert resolve("../../data", f"{s3_bucket}/run/mf/scored") == f"{s3_bucket}/run/data"
