"""Settings from flags, environment and TOML file, with their precedence and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from logpose.config import Settings, load_settings
from logpose.errors import ConfigError

EXAMPLE_CONFIG = Path(__file__).parent.parent / "conf" / "logpose.toml"


def test_defaults():
    settings = load_settings({}, {})
    assert settings == Settings()
    assert settings.http_listen == ("127.0.0.1", 8470)
    assert settings.dns_listen == (("127.0.0.1", 8653),)


def test_example_config_is_valid():
    assert load_settings({}, {}, EXAMPLE_CONFIG) == Settings()


def test_precedence_flag_over_environment_over_file(tmp_path):
    config = tmp_path / "logpose.toml"
    config.write_text('domain = "file.internal"\ndns_ttl = 7\nprobe_interval = 20\n')
    environ = {"LOGPOSE_DOMAIN": "env.internal", "LOGPOSE_DNS_TTL": "9"}
    settings = load_settings({"domain": "flag.internal"}, environ, config)
    assert settings.domain == "flag.internal"
    assert settings.dns_ttl == 9
    assert settings.probe_interval == 20.0


def test_unknown_environment_variables_ignored():
    assert load_settings({}, {"LOGPOSE_URL": "http://x", "LOGPOSE_TOKEN": "t"}) == Settings()


def test_several_dns_listen_addresses():
    settings = load_settings({"dns_listen": ["127.0.0.1:53", "[::1]:0"]}, {})
    assert settings.dns_listen == (("127.0.0.1", 53), ("::1", 0))
    assert load_settings({}, {"LOGPOSE_DNS_LISTEN": "127.0.0.1:1,127.0.0.2:2"}).dns_listen == (
        ("127.0.0.1", 1), ("127.0.0.2", 2))


@pytest.mark.parametrize(
    "flags, environ, fragment",
    [
        ({"http_listen": "localhost:80"}, {}, "--http-listen"),
        ({"http_listen": "127.0.0.1:99999"}, {}, "--http-listen"),
        ({"dns_listen": ["127.0.0.1"]}, {}, "--dns-listen"),
        ({"probe_interval": "soon"}, {}, "--probe-interval"),
        ({"probe_interval": "-1"}, {}, "--probe-interval"),
        ({}, {"LOGPOSE_PROBE_TIMEOUT": "nan"}, "LOGPOSE_PROBE_TIMEOUT"),
        ({"probe_interval": "5", "probe_timeout": "5"}, {}, "probe_timeout must be less than probe_interval"),
        ({"dns_ttl": "1.5"}, {}, "--dns-ttl"),
        ({"domain": "bad domain"}, {}, "--domain"),
        ({"jwt_key": "short"}, {}, "256 bits"),
        ({"log_level": "LOUD"}, {}, "--log-level"),
        ({"database_url": ""}, {}, "--database-url"),
    ],
)
def test_invalid_values_name_the_setting(flags, environ, fragment):
    with pytest.raises(ConfigError) as caught:
        load_settings(flags, environ)
    assert fragment in caught.value.detail


def test_unknown_toml_key_rejected(tmp_path):
    config = tmp_path / "logpose.toml"
    config.write_text('prob_interval = 3\n')
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {}, config)
    assert "prob_interval" in caught.value.detail


def test_invalid_toml_rejected(tmp_path):
    config = tmp_path / "logpose.toml"
    config.write_text('domain = \n')
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {}, config)
    assert "not valid TOML" in caught.value.detail


def test_wrong_toml_type_names_file_and_key(tmp_path):
    config = tmp_path / "logpose.toml"
    config.write_text('probe_interval = "ten"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {}, config)
    assert f"probe_interval in {config}" in caught.value.detail


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_settings({}, {}, tmp_path / "absent.toml")
    assert "cannot read configuration file" in caught.value.detail
