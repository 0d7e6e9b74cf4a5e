from __future__ import annotations

import json

import pytest

from napari_zemosaic.config import (
    DEFAULT_CONFIG,
    OPTIONS,
    ConfigError,
    apply_overrides,
    load_config,
    parse_set_option,
    save_config,
    validate_config,
)


def test_every_key_is_documented_and_valid_by_default() -> None:
    assert all(option.doc for option in OPTIONS.values())
    assert validate_config({}) == validate_config(DEFAULT_CONFIG)
    assert DEFAULT_CONFIG["sds_mode"] is False
    assert DEFAULT_CONFIG["sds_coverage_threshold"] == 0.92
    assert (DEFAULT_CONFIG["sds_min_batch_size"], DEFAULT_CONFIG["sds_target_batch_size"]) == (5, 10)


def test_invalid_value_names_key_and_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"stacking_rejection_algorithm": "magic"})
    assert info.value.key == "config_error_invalid_value"
    assert info.value.params["key"] == "stacking_rejection_algorithm"
    assert "kappa_sigma" in info.value.params["allowed"]
    with pytest.raises(ConfigError):
        validate_config({"sds_coverage_threshold": 1.5})
    with pytest.raises(ConfigError):
        validate_config({"stacking_max_iterations": 2.5})


def test_coercion_and_unknown_keys_preserved() -> None:
    config = validate_config({"sds_min_batch_size": "7", "autocrop": "off", "workflow": "mosaic-first", "my_key": 3})
    assert config["sds_min_batch_size"] == 7 and config["autocrop"] is False
    assert config["workflow"] == "mosaic_first" and config["my_key"] == 3
    # a target below the minimum is lifted to the minimum
    assert validate_config({"sds_min_batch_size": 8, "sds_target_batch_size": 3})["sds_target_batch_size"] == 8


def test_gpu_aliases_follow_what_was_set() -> None:
    assert apply_overrides(DEFAULT_CONFIG, {"use_gpu_stack": False})["stack_use_gpu"] is False
    config = apply_overrides(DEFAULT_CONFIG, {"stack_use_gpu": False})
    assert config["use_gpu_stack"] is False


def test_set_option_parsing() -> None:
    assert parse_set_option("stacking_kappa_high=2.5") == ("stacking_kappa_high", 2.5)
    assert parse_set_option("workflow=sds") == ("workflow", "sds")
    assert parse_set_option("preplan_master_groups=[[\"a\"]]") == ("preplan_master_groups", [["a"]])
    with pytest.raises(ConfigError):
        parse_set_option("novalue")


def test_save_load_roundtrip_and_old_files_get_defaults(tmp_path) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"stacking_kappa_low": 2.0, "legacy_key": "kept"}))
    config = load_config(old)
    assert config["stacking_kappa_low"] == 2.0 and config["legacy_key"] == "kept"
    assert config["sds_target_batch_size"] == 10  # absent from the old file → default
    saved = save_config(config, tmp_path / "new.json")
    assert load_config(saved) == config


def test_bad_config_files_name_the_file(tmp_path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError) as info:
        load_config(broken)
    assert info.value.key == "config_error_not_json" and str(broken) in info.value.params["path"]
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"max_memory_mb": "lots"}))
    with pytest.raises(ConfigError) as info:
        load_config(wrong)
    assert info.value.params["key"] == "max_memory_mb" and info.value.params["path"] == str(wrong)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.json")
    assert info.value.key == "config_error_file_missing"
