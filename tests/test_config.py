"""Configuration loading: YAML typing of overrides, unknown keys, wrong types, cross-field rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from naics_mlflow.config import Config, ConfigError, build_config, load_config, parse_overrides
from tests.commands import error_line, run_cli

BASE = Path(__file__).resolve().parents[1] / "conf" / "config.yaml"


def test_base_config_loads():
    config = load_config(BASE)
    assert config.model.base_model_name == "sentence-transformers/all-MiniLM-L6-v2"
    assert config.training.trainer.precision == "16-mixed"


def test_overrides_are_typed_by_yaml_rules():
    config = load_config(
        BASE,
        [
            "training.learning_rate=1e-4",
            "data_loader.batch_size=8",
            "training.trainer.max_epochs=15",
            "model.eval_sample_size=null",
            "loss.hard_negative_k=4",
            "model.lora.target_modules=[query, key, value]",
            "training.trainer.gradient_clip_val=null",
            "training.trainer.devices=auto",
        ],
    )
    assert config.training.learning_rate == pytest.approx(1e-4)
    assert isinstance(config.training.learning_rate, float)
    assert config.data_loader.batch_size == 8
    assert config.training.trainer.max_epochs == 15
    assert config.model.eval_sample_size is None
    assert config.loss.hard_negative_k == 4
    assert config.model.lora.target_modules == ["query", "key", "value"]
    assert config.training.trainer.gradient_clip_val is None
    assert config.training.trainer.devices == "auto"


def test_int_is_accepted_where_a_float_is_expected():
    assert load_config(BASE, ["loss.temperature=1"]).loss.temperature == 1


def test_later_override_wins():
    config = load_config(BASE, ["data_loader.batch_size=8", "data_loader.batch_size=4"])
    assert config.data_loader.batch_size == 4


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        (
            "training.learning_rat=1e-4",
            ["unknown config key 'training.learning_rat'", "training.learning_rate", "override"],
        ),
        ("model.lora.rr=4", ["'model.lora.rr'", "model.lora.r"]),
        ("data_loader.batch_size=eight", ["'data_loader.batch_size'", "must be int", "'eight'"]),
        ("data_loader.batch_size=true", ["must be int"]),
        ("training.learning_rate=fast", ["must be float"]),
        ("data_loader.batch_size=0", ["must be > 0"]),
        ("model.lora.r=-2", ["must be > 0"]),
        ("training.weight_decay=-0.1", ["must be >= 0"]),
        ("search.item_weight=-1", ["'search.item_weight'", "must be >= 0"]),
        ("search.query_max_length=0", ["'search.query_max_length'", "must be > 0"]),
        (
            "search.query_max_length=600",
            ["'search.query_max_length'", "must be at most 512 (the tokens a BERT encoder reads)"],
        ),
        (
            "data_loader.tokenization.description_max_length=513",
            ["'data_loader.tokenization.description_max_length'", "must be at most 512"],
        ),
        ("loss.hierarchy_rows=0", ["'loss.hierarchy_rows'", "must be > 0"]),
        ("model.moe.top_k=5", ["top_k (5)", "num_experts (4)"]),
        ("training.optimizer=sgd", ["must be one of", "adamw"]),
        ("search.device=gpu", ["'search.device'", "must be one of", "cuda"]),
        ("training.trainer.precision=64", ["'training.trainer.precision'", "must be one of"]),
        ("training.trainer.accelerator=tpu", ["must be one of auto, cpu, gpu, cuda"]),
        ("training.trainer.strategy=ddpp", ["must be one of auto, ddp"]),
        ("data_loader.val_split=1.5", ["val_split"]),
        (
            "training.trainer.devices=0",
            ["'training.trainer.devices'", "an int > 0) or auto, got 0"],
        ),
        ("training.trainer.devices=-1", ["an int > 0) or auto, got -1"]),
        ("training.trainer.devices=0,1", ["an int > 0) or auto, got '0,1'"]),
        ("training.trainer.gradient_clip_val=-1", ["'training.trainer.gradient_clip_val'", ">= 0"]),
        ("model=3", ["'model' must be a mapping"]),
        ("no_equals_sign", ["not KEY=VALUE"]),
    ],
)
def test_bad_overrides_fail_in_one_line(override, fragments):
    with pytest.raises(ConfigError) as caught:
        load_config(BASE, [override])
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    raw = yaml.safe_load(BASE.read_text())
    raw["training"]["trainer"]["max_epoch"] = 3
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        ConfigError, match=r"'training.trainer.max_epoch' in .*config.yaml.*max_epochs"
    ):
        load_config(path)


def test_missing_key_in_base_file(tmp_path):
    raw = yaml.safe_load(BASE.read_text())
    del raw["loss"]["temperature"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"'loss\.temperature' is missing"):
        load_config(path)


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("training:\n  learning_rate: [1e-4\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_a_config_that_is_a_folder_or_not_utf8_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path} is a folder; give the path of a YAML"):
        load_config(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_bytes(b"training:\n  learning_rate: 1e-4 # caf\xe9\n")
    with pytest.raises(
        ConfigError, match=r"config.yaml is not UTF-8 text \(invalid continuation byte at byte"
    ):
        load_config(path)


def test_a_config_with_no_curricula_beside_it_says_where_they_are_read_from(tmp_path):
    (tmp_path / "config.yaml").write_text(BASE.read_text())
    result = run_cli(tmp_path, "train", "--list-curricula", "--config", "config.yaml")
    assert error_line(result) == (
        "error: no curricula in text_curriculum: stages are read from text_curriculum/ beside "
        "the --config file"
    )


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("!!python/object/apply:os.system ['echo unsafe']\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_layers_apply_in_order_and_name_their_source():
    config = build_config(
        BASE,
        [
            ({"training": {"learning_rate": 1e-3}}, "01_stage.yaml"),
            ({"training": {"learning_rate": 5e-5}}, "chain"),
        ],
    )
    assert config.training.learning_rate == 5e-5
    with pytest.raises(ConfigError, match=r"in chain_default\.yaml"):
        build_config(BASE, [({"training": {"lr": 1}}, "chain_default.yaml")])


def test_hash_changes_with_values():
    assert load_config(BASE).hash() == load_config(BASE).hash()
    assert load_config(BASE).hash() != load_config(BASE, ["training.seed=1"]).hash()


def test_parse_overrides_nests_keys():
    assert parse_overrides(["a.b.c=1", "a.d=x"], "test") == {"a": {"b": {"c": 1}, "d": "x"}}


def test_a_configuration_saved_before_the_search_keys_searched_without_them():
    saved = load_config(BASE).to_dict()
    del saved["search"]["item_weight"], saved["search"]["backbone_dtype"]
    del saved["search"]["device"], saved["search"]["query_max_length"]
    search = Config.from_dict(saved).search
    # The nearest-item signal did not exist yet, the backbone read in float32 on the CPU, and
    # queries were cut where index items are.
    assert (search.item_weight, search.backbone_dtype, search.device) == (0.0, "float32", "cpu")
    assert search.query_max_length == 32
    assert search.lexical_weight == saved["search"]["lexical_weight"]


def test_a_configuration_saved_before_backbone_dropout_trained_with_it():
    saved = load_config(BASE, ["model.backbone_dropout=false"]).to_dict()
    del saved["model"]["backbone_dropout"]
    assert Config.from_dict(saved).model.backbone_dropout is True


def test_a_configuration_saved_before_hierarchy_rows_took_every_pair():
    saved = load_config(BASE, ["loss.hierarchy_rows=512"]).to_dict()
    del saved["loss"]["hierarchy_rows"]
    assert Config.from_dict(saved).loss.hierarchy_rows is None
