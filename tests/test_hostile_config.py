"""Hostile settings files and store URLs: each is refused in one line, fast, without a
traceback, and without showing any part of a password."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from stylepipe.cli import main
from stylepipe.config import ConfigError, load_config
from stylepipe.stores import is_masked, redact_url, scrub, url_secrets
from tests.helpers import DEMO, LOCAL_POSTGRES, POSTGRES_ENV, _answers

ROOT = Path(__file__).resolve().parents[1]


def _one_line_exit_2(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with one line on stderr and no traceback. Returns that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ not UTF-8


def test_a_config_that_is_not_utf8_is_one_line_naming_the_file(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: démo\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8") as err:
        load_config(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)

    line = _one_line_exit_2(capsys, ["train", "--config", str(path)])
    assert "latin1.yaml" in line and "UTF-8" in line


# ------------------------------------------------------------------ billion laughs


def _billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        aliases = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{aliases}]")
    return "\n".join(lines) + f"\nname: *a{levels - 1}\n"


def test_a_billion_laughs_config_is_refused_in_one_line_fast(tmp_path, capsys):
    path = tmp_path / "laughs.yaml"
    path.write_text(_billion_laughs())
    started = time.monotonic()
    with pytest.raises(ConfigError, match="alias") as err:
        load_config(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)

    line = _one_line_exit_2(capsys, ["train", "--config", str(path)])
    assert "laughs.yaml" in line and "alias" in line
    assert time.monotonic() - started < 1.0


def test_an_alias_that_refers_to_itself_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("name: &me [*me]\n")
    with pytest.raises(ConfigError, match="itself"):
        load_config(path)


def test_a_billion_laughs_override_is_refused_in_one_line_fast(capsys):
    value = "{" + _billion_laughs(7).replace("\n", ", ").rstrip(", ") + "}"
    started = time.monotonic()
    line = _one_line_exit_2(capsys, ["train", "--config", str(DEMO), "--set", f"search.space={value}"])
    assert "search.space" in line and "alias" in line
    assert time.monotonic() - started < 1.0


def test_a_config_over_the_size_bound_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_text("name: demo\n" + "# padding\n" * 120_000)  # 1.2 MB of comments
    with pytest.raises(ConfigError, match="MiB"):  # before the CLI, which would train on it
        load_config(path)
    line = _one_line_exit_2(capsys, ["train", "--config", str(path)])
    assert "huge.yaml" in line and "MiB" in line


def test_the_shipped_configs_and_a_few_legitimate_aliases_still_load(tmp_path):
    for name in ("demo.yaml", "coco256.yaml"):
        assert load_config(ROOT / "configs" / name).name
    aliased = tmp_path / "aliased.yaml"
    aliased.write_text(
        "name: aliased\n"
        "loss:\n  style_layers: &layers [relu1_2, relu2_2]\n  content_layers: *layers\n"
        "train:\n  <<: &fast {lr: 0.002, clip_norm: 5.0}\n  lr: 0.003\n"  # a merged key overridden
        "search:\n  space:\n    lr: [0.0001, 0.01]\n"
    )
    config = load_config(aliased)
    assert config.loss.style_layers == config.loss.content_layers == ["relu1_2", "relu2_2"]
    assert (config.train.lr, config.train.clip_norm) == (0.003, 5.0)


# ------------------------------------------------------------------ duplicate keys


@pytest.mark.parametrize(
    "text, key, line",
    [
        ("name: a\ntrain:\n  lr: 0.1\nguard:\n  divergence_factor: 20\ntrain:\n  steps: 5\n", "train", 6),
        ("name: a\ntrain:\n  lr: 0.1\n  steps: 5\n  lr: 0.2\n", "lr", 5),
    ],
)
def test_a_duplicate_key_is_refused_naming_the_key_and_its_line(tmp_path, capsys, text, key, line):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="duplicate"):  # before the CLI, which would train on it
        load_config(path)
    found = _one_line_exit_2(capsys, ["train", "--config", str(path)])
    assert "twice.yaml" in found and "duplicate" in found
    assert f"'{key}'" in found and f"line {line}" in found


def test_a_duplicate_key_in_an_override_is_refused(capsys):
    override = "search.space={lr: [0.001, 0.01], lr: [0.1, 1]}"
    with pytest.raises(ConfigError, match="duplicate"):  # before the CLI, which would train on it
        load_config(DEMO, [override])
    found = _one_line_exit_2(capsys, ["train", "--config", str(DEMO), "--set", override])
    assert "search.space" in found and "duplicate" in found and "'lr'" in found


# ------------------------------------------------------------------ an @ in a password

AT_URL = "postgresql://postgres:HxA@B9931@127.0.0.1/x"
PARTS = ("HxA", "B9931")


def test_a_password_with_an_unencoded_at_is_masked_whole_and_in_every_fragment():
    shown = redact_url(AT_URL)
    assert shown == "postgresql://postgres:***@127.0.0.1/x" and is_masked(shown) and not is_masked(AT_URL)
    assert not any(part in shown for part in PARTS)
    assert {"HxA@B9931", "HxA", "B9931"} <= set(url_secrets(AT_URL))
    for message in (
        "failed to resolve host 'B9931@127.0.0.1': [Errno -2] Name or service not known",
        'connection to server at "B9931@127.0.0.1", port 5432 failed: password "HxA" rejected',
        f"could not connect to {AT_URL}",
    ):
        scrubbed = scrub(message, AT_URL)
        assert not any(part in scrubbed for part in PARTS), scrubbed
    assert "127.0.0.1" in scrub("failed to resolve host 'B9931@127.0.0.1'", AT_URL)  # the host stays


def test_a_search_on_such_a_url_is_one_line_without_any_part_of_the_password(tmp_path, prepared, capsys):
    if os.environ.get(POSTGRES_ENV) != LOCAL_POSTGRES and not _answers(LOCAL_POSTGRES):
        pytest.skip(f"no PostgreSQL answers at {LOCAL_POSTGRES}")
    line = _one_line_exit_2(
        capsys,
        [
            "search",
            "--config",
            str(DEMO),
            "--set",
            f"search.storage={AT_URL}",
            "--set",
            f"run_dir={tmp_path}",
            "--set",
            f"data.content={prepared}",
        ],
    )
    assert "Optuna storage" in line and not any(part in line for part in PARTS), line
