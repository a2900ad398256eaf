"""The settings table: its integrity, its parsers and the environment (issue 2: one settings table)."""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Any

import pytest

from uvworker.settings import BY_NAME, SETTINGS, from_environ, markdown_table

CORE = """app factory app_dir host port uds fd backlog http loop interface lifespan root_path
proxy_headers forwarded_allow_ips server_header date_header headers limit_concurrency
limit_request_line limit_request_fields limit_request_field_size limit_request_head timeout_keep_alive
timeout_request_header timeout_request_body min_request_body_rate timeout_graceful_shutdown
ssl_keyfile ssl_certfile ssl_keyfile_password ssl_ca_certs ssl_cert_reqs ssl_ciphers log_level
log_config access_log access_log_format proxy_protocol proxy_allow_ips""".split()


def test_table_has_the_core_settings_each_once() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    assert set(CORE) <= set(names)
    flags = [flag for s in SETTINGS for flag in s.flags]
    assert len(flags) == len(set(flags))
    for s in SETTINGS:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", s.name)
        assert s.env == "UVWORKER_" + s.name.upper()
        assert s.help.endswith(".") and s.help[0].isupper()


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_defaults_are_valid_values(setting: Any) -> None:
    value = setting.coerce(setting.default)
    assert setting.coerce(value) == value  # parsing is idempotent


def test_defaults_users_rely_on() -> None:
    defaults = {s.name: s.default for s in SETTINGS}
    assert defaults["host"] == "127.0.0.1" and defaults["port"] == 8000
    assert defaults["backlog"] == 2048
    assert (defaults["timeout_keep_alive"], defaults["timeout_request_header"]) == (5, 10)
    assert (defaults["timeout_request_body"], defaults["min_request_body_rate"]) == (20, 500)
    assert defaults["timeout_graceful_shutdown"] == 30
    assert defaults["limit_request_line"] == defaults["limit_request_field_size"] == 8190
    assert defaults["limit_request_fields"] == 100
    assert defaults["forwarded_allow_ips"] == defaults["proxy_allow_ips"] == "127.0.0.1"
    assert defaults["ssl_cert_reqs"] == ssl.CERT_NONE and defaults["ssl_ciphers"] is None
    assert defaults["log_level"] == "info" and defaults["access_log"] is True
    assert defaults["proxy_protocol"] is False


@pytest.mark.parametrize(
    "name, given, expected",
    [
        ("port", "8080", 8080),
        ("port", 0, 0),
        ("timeout_keep_alive", "2.5", 2.5),
        ("timeout_keep_alive", 3, 3.0),
        ("access_log", "No", False),
        ("access_log", "1", True),
        ("http", "H11", "h11"),
        ("ssl_cert_reqs", "2", 2),
        ("app", "pkg.mod:factory.app", "pkg.mod:factory.app"),
        ("headers", ["X-A: 1", ("x-b", " two ")], [("X-A", "1"), ("x-b", "two")]),
        ("headers", "X-A: 1\n\nX-B:2\n", [("X-A", "1"), ("X-B", "2")]),  # environment form
        ("forwarded_allow_ips", "10.0.0.0/8, ::1 ,*", "10.0.0.0/8,::1,*"),
        ("forwarded_allow_ips", ["10.0.0.1", "192.168.0.0/16"], "10.0.0.1,192.168.0.0/16"),
        ("ssl_certfile", Path("/tmp/cert.pem"), "/tmp/cert.pem"),
        ("limit_concurrency", None, None),
        ("log_config", {"version": 1}, {"version": 1}),
    ],
)
def test_valid_values(name: str, given: Any, expected: Any) -> None:
    assert BY_NAME[name].coerce(given) == expected


@pytest.mark.parametrize(
    "name, given, message",
    [
        ("port", "abc", "'abc' is not an integer"),
        ("port", 65536, "65536 is not between 0 and 65535"),
        ("port", "-1", "'-1' is not between 0 and 65535"),
        ("port", True, "True is not an integer"),
        ("backlog", "0", "'0' is not at least 1"),
        ("timeout_keep_alive", "-1", "'-1' is not a finite number of at least 0"),
        ("timeout_keep_alive", "soon", "'soon' is not a number"),
        ("timeout_graceful_shutdown", None, "None is not a number"),
        ("access_log", "maybe", "'maybe' is not a boolean"),
        ("http", "curl", "'curl' is not one of auto, httptools, h11"),
        ("ssl_cert_reqs", "3", "3 is not one of 0, 1, 2"),
        ("app", "main", "'main' is not of the form module:attribute"),
        ("app", "main:", "'main:' is not of the form module:attribute"),
        ("app", 42, "42 is not an application"),
        ("headers", ["no-colon"], "'no-colon' is not a NAME:VALUE header"),
        ("headers", ["bad name: x"], "'bad name: x' is not a valid NAME:VALUE header"),
        ("headers", ["x-a: 1\r\nInjected: 1"], "is not a valid NAME:VALUE header"),
        ("forwarded_allow_ips", "10.0.0.1,proxy.local", "'proxy.local' is not an IP address"),
        ("root_path", 5, "5 is not a string"),
    ],
)
def test_invalid_values_say_why(name: str, given: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        BY_NAME[name].coerce(given)
    assert message in str(info.value)


def test_environment_is_parsed_and_empty_variables_are_unset() -> None:
    environ = {
        "UVWORKER_PORT": "9000",
        "UVWORKER_ACCESS_LOG": "off",
        "UVWORKER_HEADERS": "X-A: 1\nX-B: 2",
        "UVWORKER_HOST": "",
        "PORT": "1",
    }
    assert from_environ(environ) == {"port": 9000, "access_log": False, "headers": [("X-A", "1"), ("X-B", "2")]}


def test_uvicorn_forwarded_allow_ips_variable_is_a_fallback() -> None:
    assert from_environ({"FORWARDED_ALLOW_IPS": "*"}) == {"forwarded_allow_ips": "*"}
    both = {"FORWARDED_ALLOW_IPS": "*", "UVWORKER_FORWARDED_ALLOW_IPS": "10.0.0.1"}
    assert from_environ(both) == {"forwarded_allow_ips": "10.0.0.1"}


def test_invalid_environment_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match=r"^UVWORKER_BACKLOG: 'many' is not an integer$"):
        from_environ({"UVWORKER_BACKLOG": "many"})


def test_markdown_table_has_one_row_per_setting() -> None:
    rows = markdown_table().splitlines()[2:]
    assert len(rows) == len(SETTINGS)
    assert "| `--port PORT` | `UVWORKER_PORT` | `8000` |" in markdown_table()
    assert "| `--proxy-headers`, `--no-proxy-headers` | `UVWORKER_PROXY_HEADERS` | `on` |" in markdown_table()
