"""The DNS allow list and settings, through the real server process and its configuration."""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from logpose.config import load_settings
from logpose.errors import ConfigError

ZONE = "logpose.internal"
TIMEOUT = 3.0


def ask_soa(server, tcp: bool = False) -> dns.message.Message:
    send = dns.query.tcp if tcp else dns.query.udp
    return send(dns.message.make_query(ZONE, "SOA"), "127.0.0.1", port=server.dns_port, timeout=TIMEOUT)


@pytest.mark.parametrize(
    ("allow", "rcode"),
    [
        ("192.0.2.0/24,2001:db8::/32", dns.rcode.REFUSED),  # 127.0.0.1 is not in the list
        ("192.0.2.0/24,127.0.0.0/8", dns.rcode.NOERROR),
    ],
)
def test_server_allow_list(server_factory, allow, rcode):
    server = server_factory(extra_args=["--dns-allow", allow])

    for tcp in (False, True):
        response = ask_soa(server, tcp)
        assert response.rcode() == rcode
        assert bool(response.flags & dns.flags.AA) == (rcode == dns.rcode.NOERROR)


@pytest.mark.parametrize(
    ("flags", "environ", "expected"),
    [
        ({}, {}, {"dns_max_udp_payload": 1232, "dns_answer_limit": 0, "dns_reverse_zones": (), "dns_allow": (),
                  "dns_rate_limit": 0, "recursors": (), "recursor_timeout": 2.0}),
        ({"dns_allow": ["127.0.0.0/8, ::1/128"]}, {}, {"dns_allow": (ipaddress.ip_network("127.0.0.0/8"),
                                                                   ipaddress.ip_network("::1/128"))}),
        ({"dns_reverse_zones": ["10.0.0.0/8", "fd00::/8"]}, {}, {"dns_reverse_zones": (ipaddress.ip_network("10.0.0.0/8"),
                                                                                      ipaddress.ip_network("fd00::/8"))}),
        ({}, {"LOGPOSE_RECURSORS": "127.0.0.1:5353,[::1]:53"}, {"recursors": (("127.0.0.1", 5353), ("::1", 53))}),
        ({"dns_max_udp_payload": "4096", "dns_answer_limit": "3", "dns_rate_limit": "50", "recursor_timeout": "0.5"},
         {}, {"dns_max_udp_payload": 4096, "dns_answer_limit": 3, "dns_rate_limit": 50, "recursor_timeout": 0.5}),
    ],
)
def test_dns_settings_parsed(flags, environ, expected):
    settings = load_settings(flags, environ=environ)

    for key, value in expected.items():
        assert getattr(settings, key) == value


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"dns_max_udp_payload": "511"}, "--dns-max-udp-payload: must be a whole number of bytes from 512 to 65535"),
        ({"dns_max_udp_payload": "65536"}, "--dns-max-udp-payload"),
        ({"dns_answer_limit": "-1"}, "--dns-answer-limit: must be a whole number from 0 to 65535"),
        ({"dns_rate_limit": "fast"}, "--dns-rate-limit: must be a whole number of responses per second"),
        ({"dns_allow": ["10.0.0.1/8"]}, "--dns-allow: '10.0.0.1/8' is not a network"),
        ({"dns_allow": ["localhost"]}, "--dns-allow: 'localhost' is not a network"),
        ({"dns_reverse_zones": ["300.0.0.0/8"]}, "--dns-reverse-zones"),
        ({"recursors": ["127.0.0.1"]}, "--recursors: '127.0.0.1' is not 'HOST:PORT'"),
        ({"recursors": ["127.0.0.1:0"]}, "--recursors: the port of recursor 127.0.0.1 must be from 1 to 65535"),
        ({"recursors": ["resolver.example:53"]}, "is not an IP address"),
        ({"recursor_timeout": "0"}, "--recursor-timeout: must be a number of seconds from 0.01 to 60"),
    ],
)
def test_dns_settings_rejected(flags, message):
    with pytest.raises(ConfigError) as raised:
        load_settings(flags, environ={})

    assert message in raised.value.detail


def test_dns_settings_from_toml(tmp_path):
    config = tmp_path / "logpose.toml"
    config.write_text('dns_allow = ["127.0.0.0/8"]\nrecursors = []\ndns_reverse_zones = ["10.0.0.0/8"]\n')

    settings = load_settings({}, environ={}, config_file=config)

    assert settings.dns_allow == (ipaddress.ip_network("127.0.0.0/8"),)
    assert settings.recursors == ()
    assert settings.dns_reverse_zones == (ipaddress.ip_network("10.0.0.0/8"),)
