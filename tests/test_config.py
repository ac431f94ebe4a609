from pathlib import Path

import pytest

from stylepipe.config import ConfigError, load_config
from tests.helpers import DEMO


def test_demo_config_loads_with_its_values():
    config = load_config(DEMO)
    assert config.name == "demo"
    assert config.loss.vgg_weights == "random"
    assert config.train.precision == "fp32"


def test_override_changes_one_setting_and_parses_yaml_values():
    config = load_config(DEMO, ["train.lr=0.05", "train.clip_norm=null", "loss.style_layers=[relu1_2]"])
    assert config.train.lr == 0.05
    assert config.train.clip_norm is None
    assert config.loss.style_layers == ["relu1_2"]
    assert config.train.steps == load_config(DEMO).train.steps


def test_unknown_key_in_file_names_key_and_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "train.learning_rate" in str(err.value)
    assert str(bad) in str(err.value)


def test_wrong_type_in_file_names_key_and_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"train\.steps") as err:
        load_config(bad)
    assert str(bad) in str(err.value)


def test_out_of_range_and_unknown_layer_are_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(DEMO, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"relu9_9"):
        load_config(DEMO, ["loss.style_layers=[relu9_9]"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=0.1", "train.lrr"),
        ("train.lr=abc", "train.lr"),
        ("nosuchsection.x=1", "nosuchsection"),
        ("train.lr", "section.key=value"),
        ("train.precision=fp8", "train.precision"),
    ],
)
def test_bad_override_is_refused_with_the_key(override: str, fragment: str):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert fragment in str(err.value)


def test_missing_config_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_the_final_models_settings_have_their_own_section(tmp_path: Path):
    config = load_config(DEMO, ["train.steps=30"])
    assert (config.final.steps, config.final.image_size) == (300, 64)  # configs/demo.yaml's final:
    assert (config.final_run_steps, config.final_run_image_size) == (300, 64)
    unset = load_config(
        DEMO, ["final.steps=null", "final.image_size=null", "train.steps=7", "data.image_size=48"]
    )
    assert (unset.final_run_steps, unset.final_run_image_size) == (7, 48)  # the trials' own


def test_a_moved_setting_is_read_as_its_new_key_with_a_one_line_note(tmp_path: Path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text(
        "tracking:\n  final_steps: 40\n  final_image_size: 32\n  train_final_model: false\n"
        "  mirror_checkpoints: false\n  registered_model: mine\n"
    )
    with caplog.at_level("WARNING", logger="stylepipe.config"):
        config = load_config(old, ["tracking.showcase_size=128"])
    assert (config.final.steps, config.final.image_size, config.final.train) == (40, 32, False)
    assert not config.final.mirror_checkpoints and config.final.showcase_size == 128
    assert config.tracking.registered_model == "mine"
    notes = [r.getMessage() for r in caplog.records]
    assert f"tracking.final_steps is now final.steps: read as such (rename it in {old})" in notes
    assert any(n.startswith("tracking.showcase_size is now final.showcase_size") for n in notes)
    assert len(notes) == 5 and all("\n" not in n for n in notes)  # one line per moved key, once
