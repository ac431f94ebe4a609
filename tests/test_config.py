from pathlib import Path

import pytest

from stylepipe.config import ConfigError, load_config
from tests.conftest import DEMO


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
