from pathlib import Path

import pytest

from appliance.core.errors import ConfigError
from appliance.core.settings import load_settings


def test_defaults_need_no_file() -> None:
    settings = load_settings(env={})
    assert settings.data_dir == Path("data")
    assert settings.store.mode == "edge"
    assert settings.index_dir == Path("data/index")


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "data_dir: /from/file\nchunking:\n  max_tokens: 100\nstore:\n  mode: server\n"
    )
    env = {"APPLIANCE_DATA_DIR": "/from/env", "APPLIANCE_STORE__URL": "http://qdrant:6333"}
    settings = load_settings(config, env=env, overrides={"chunking": {"overlap_tokens": 7}})
    assert settings.data_dir == Path("/from/env")
    assert settings.chunking.max_tokens == 100
    assert settings.chunking.overlap_tokens == 7
    assert settings.store.mode == "server"
    assert settings.store.url == "http://qdrant:6333"


def test_config_path_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("ingest:\n  max_file_mb: 5\n")
    assert load_settings(env={"APPLIANCE_CONFIG": str(config)}).ingest.max_file_mb == 5


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"APPLIANCE_STORE__MODE": "cloud"}, "store.mode"),
        ({"APPLIANCE_CHUNKING__MAX_TOKENS": "-3"}, "chunking.max_tokens"),
        ({"APPLIANCE_NO_SUCH": "1"}, "no_such"),
    ],
)
def test_invalid_values_are_named(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_settings(env=env)


def test_unreadable_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(bad, env={})


def test_ocr_languages_are_a_list_or_tesseracts_plus_form() -> None:
    assert load_settings(env={}).ocr.languages == ["eng"]
    env = {"APPLIANCE_OCR__LANGUAGES": "eng+deu", "APPLIANCE_OCR__ENGINE": "off"}
    settings = load_settings(env=env)
    assert settings.ocr.languages == ["eng", "deu"]
    assert settings.ocr.engine == "off"
    with pytest.raises(ConfigError, match="chi_sim"):
        load_settings(env={"APPLIANCE_OCR__LANGUAGES": "eng+../x"})
