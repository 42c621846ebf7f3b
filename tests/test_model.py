"""Validators of the domain types, table-driven."""

from __future__ import annotations

import pytest

from logpose.errors import ValidationError
from logpose.model import (
    AddressKind,
    CheckType,
    Protocol,
    parse_address,
    parse_check,
    parse_instance_spec,
    parse_protocol,
    parse_service_code,
)


@pytest.mark.parametrize("code", ["a", "auth-svc", "x1", "0day", "a" * 63, "a-b-c"])
def test_service_code_accepted(code):
    assert parse_service_code(code) == code


@pytest.mark.parametrize(
    "code, fragment",
    [
        ("Auth-Svc", "lower case"),
        ("-auth", "DNS label"),
        ("auth-", "DNS label"),
        ("a" * 64, "DNS label"),
        ("", "DNS label"),
        ("auth.svc", "DNS label"),
        ("auth_svc", "DNS label"),
        ("ns", "reserved"),
        (5, "string"),
    ],
)
def test_service_code_rejected(code, fragment):
    with pytest.raises(ValidationError) as caught:
        parse_service_code(code)
    assert caught.value.field == "code"
    assert fragment in caught.value.reason


@pytest.mark.parametrize(
    "text, host, port, kind, shown",
    [
        ("10.0.0.5:8080", "10.0.0.5", 8080, AddressKind.IPV4, "10.0.0.5:8080"),
        ("[::1]:53", "::1", 53, AddressKind.IPV6, "[::1]:53"),
        ("[2001:db8::1]:443", "2001:db8::1", 443, AddressKind.IPV6, "[2001:db8::1]:443"),
        ("db.example.com:5432", "db.example.com", 5432, AddressKind.HOSTNAME, "db.example.com:5432"),
        ("localhost:1", "localhost", 1, AddressKind.HOSTNAME, "localhost:1"),
        ("h:65535", "h", 65535, AddressKind.HOSTNAME, "h:65535"),
    ],
)
def test_address_accepted(text, host, port, kind, shown):
    address = parse_address(text)
    assert (address.host, address.port, address.kind) == (host, port, kind)
    assert str(address) == shown


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.5", "10.0.0.5:", ":80", "10.0.0.5:0", "10.0.0.5:65536", "10.0.0.5:http",
        "999.1.1.1:80", "1.2.3:80", "2001:db8::1:80", "[2001:db8::1]80", "[zz::1]:80",
        "[fe80::1%eth0]:80", "bad_host:80", "-x.example:80", "a..b:80", "", None, 80,
    ],
)
def test_address_rejected(text):
    with pytest.raises(ValidationError) as caught:
        parse_address(text)
    assert caught.value.field == "address"


def test_address_normalised_for_registration_key():
    assert parse_address("[2001:DB8:0::1]:80").normalized_host == "2001:db8::1"
    assert parse_address("DB.Example.com:80").normalized_host == "db.example.com"


@pytest.mark.parametrize("text, protocol", [("http", Protocol.HTTP), ("HTTPS", Protocol.HTTPS),
                                            ("gRPC", Protocol.GRPC), ("Tcp", Protocol.TCP), ("udp", Protocol.UDP)])
def test_protocol_case_insensitive(text, protocol):
    assert parse_protocol(text) is protocol


@pytest.mark.parametrize("protocol, labels", [(Protocol.HTTP, ("_http", "_tcp")), (Protocol.UDP, ("_udp", "_udp")),
                                              (Protocol.TCP, ("_tcp", "_tcp"))])
def test_protocol_srv_labels(protocol, labels):
    assert protocol.srv_labels == labels


def test_protocol_rejected_lists_accepted():
    with pytest.raises(ValidationError) as caught:
        parse_protocol("ftp")
    assert "Http, Https, Grpc, Tcp, Udp" in caught.value.reason


def test_udp_defaults_to_no_check():
    assert parse_check(None, Protocol.UDP).type is CheckType.NONE
    assert parse_check(None, Protocol.HTTP).type is CheckType.TCP


@pytest.mark.parametrize(
    "check, field",
    [
        ({"type": "ttl"}, "check.ttl"),
        ({"type": "ttl", "ttl": 0}, "check.ttl"),
        ({"type": "ttl", "ttl": "5"}, "check.ttl"),
        ({"type": "tcp", "ttl": 5}, "check.ttl"),
        ({"type": "icmp"}, "check.type"),
        ({"interval": 5, "timeout": 5}, "check.timeout"),
        ({"interval": 0}, "check.interval"),
        ({"timeout": "2"}, "check.timeout"),
        ({"rise": 0}, "check.rise"),
        ({"fall": 1.5}, "check.fall"),
        ({"deregister_after": -1}, "check.deregister_after"),
        ({"type": "tcp", "path": "/health"}, "check.path"),
        ({"type": "ttl", "ttl": 5, "interval": 5}, "check.interval"),
        ({"type": "http", "path": "health"}, "check.path"),
        ({"type": "http", "path": "/a b"}, "check.path"),
        ({"type": "http", "scheme": "ftp"}, "check.scheme"),
        ({"type": "http", "tls_verify": "no"}, "check.tls_verify"),
        ({"type": "http", "expected_status": 99}, "check.expected_status"),
        ("tcp", "check"),
    ],
)
def test_check_rejected(check, field):
    with pytest.raises(ValidationError) as caught:
        parse_check(check, Protocol.HTTP)
    assert caught.value.field == field


def test_http_check_defaults_follow_protocol():
    plain = parse_check({"type": "http"}, Protocol.HTTP)
    assert (plain.path, plain.scheme, plain.tls_verify, plain.expected_status) == ("/", "http", True, None)
    secure = parse_check({"type": "http", "path": "/health", "tls_verify": False}, Protocol.HTTPS)
    assert (secure.path, secure.scheme, secure.tls_verify) == ("/health", "https", False)


def test_check_settings_kept():
    check = parse_check({"type": "tcp", "interval": 5, "timeout": 1, "rise": 3, "fall": 4,
                         "deregister_after": 600}, Protocol.TCP)
    assert (check.interval, check.timeout, check.rise, check.fall, check.deregister_after) == (5, 1, 3, 4, 600)
    assert check.to_json() == {"type": "tcp", "interval": 5, "timeout": 1, "rise": 3, "fall": 4,
                               "deregister_after": 600}


def test_instance_spec_defaults():
    spec = parse_instance_spec({"address": "10.0.0.5:80", "protocol": "http"})
    assert spec.weight == 1
    assert spec.tags == ()
    assert spec.check.type is CheckType.TCP
