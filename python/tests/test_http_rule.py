"""A token or credentials are only sent over https or to loopback (the Rust client's rule)."""

from __future__ import annotations

import pytest

from eks_upgrade_agent._http import Http
from eks_upgrade_agent.errors import InvalidInputError


@pytest.mark.parametrize("url,token", [
    ("http://u:s3cr3t@eua.example.com", None),
    ("http://s3cr3t@10.0.0.1:8080", None),
    ("http://eua.example.com:8080", "s3cr3t"),
    ("http://127.0.0.1.evil.example", "s3cr3t"),
])
def test_plain_http_with_credentials_is_refused_beyond_loopback(url, token, monkeypatch):
    monkeypatch.delenv("EUA_ALLOW_PLAIN_HTTP", raising=False)
    with pytest.raises(InvalidInputError) as e:
        Http(url, token)
    msg = str(e.value)
    assert "over plain http" in msg and "use https://" in msg, msg
    assert "s3cr3t" not in msg, msg
    assert "EUA_ALLOW_PLAIN_HTTP=1" in msg, msg
    # The explicit opt-out (an encrypted hop underneath, e.g. a service mesh) lets it through.
    monkeypatch.setenv("EUA_ALLOW_PLAIN_HTTP", "1")
    Http(url, token)


@pytest.mark.parametrize("url,token", [
    ("https://u:s3cr3t@eua.example.com", "t"),
    ("http://u:s3cr3t@127.0.0.1:1", "t"),
    ("http://localhost:1", "t"),
    ("http://[::1]:1", "t"),
    ("http://eua.example.com:8080", None),
])
def test_https_loopback_and_no_credentials_are_accepted(url, token):
    Http(url, token)


def test_the_opt_out_takes_one_or_zero(monkeypatch):
    # The Rust CLI's rule: anything else is an error, not a silent "off".
    monkeypatch.setenv("EUA_ALLOW_PLAIN_HTTP", "yes please")
    with pytest.raises(InvalidInputError) as e:
        Http("http://127.0.0.1:1", None)
    assert "EUA_ALLOW_PLAIN_HTTP must be 1 or 0" in str(e.value)
