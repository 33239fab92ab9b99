"""The browser panel's access policy on its own: tokens, Host and Origin names, limits."""

import pytest

pytest.importorskip("trame_slicer")
from instructx2x.errors import ParameterError
from InstructX2XModuleLib.web.access import AccessPolicy, new_token, read_token_file

pytestmark = pytest.mark.web
TOKEN = "t" * 43


def test_tokens_are_fresh_long_and_compared_whole():
    first, second = new_token(), new_token()
    assert first != second and len(first) >= 43
    policy = AccessPolicy(first)
    assert policy.token_matches(first)
    assert not any(policy.token_matches(c) for c in (second, first[:-1], first + "x", None, 12, ""))
    with pytest.raises(ParameterError, match="at least 32"):
        AccessPolicy("short")


def test_a_token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\nignored\n")
    assert read_token_file(path) == TOKEN
    for text, message in (("", "has 0 characters"), ("x" * 40 + "&y", "only letters")):
        path.write_text(text)
        with pytest.raises(ParameterError, match=message):
            read_token_file(path)
    with pytest.raises(ParameterError, match="cannot read the token file missing"):
        read_token_file(tmp_path / "missing")


def test_host_and_origin_name_this_server_only():
    policy = AccessPolicy(TOKEN)
    assert all(
        policy.host_allowed(f"{name}:8080", 8080) for name in ("127.0.0.1", "localhost", "[::1]", "LOCALHOST")
    )
    assert not any(
        policy.host_allowed(h, 8080) for h in ("127.0.0.1:8081", "evil.example:8080", "127.0.0.1", None)
    )
    assert policy.origin_allowed("http://localhost:8080", 8080)
    assert not any(
        policy.origin_allowed(o, 8080)
        for o in ("http://127.0.0.1:9999", "https://127.0.0.1:8080", "http://evil.example:8080", "null", None)
    )


def test_a_reverse_proxy_origin_and_an_exposed_host():
    behind = AccessPolicy(TOKEN, origins=("https://xray.example.org",))
    assert behind.host_allowed("xray.example.org", 8080) and behind.origin_allowed(
        "https://xray.example.org/", 8080
    )
    assert not behind.origin_allowed("http://xray.example.org", 8080)  # not over TLS: another origin
    exposed = AccessPolicy(TOKEN, host="10.0.0.5")
    assert exposed.host_allowed("10.0.0.5:8080", 8080) and exposed.origin_allowed(
        "http://10.0.0.5:8080", 8080
    )
    wildcard = AccessPolicy(TOKEN, host="0.0.0.0")
    assert not wildcard.host_allowed("0.0.0.0:8080", 8080) and not wildcard.host_allowed(
        "10.0.0.5:8080", 8080
    )
    for origin in ("xray.example.org", "ftp://x.example", "https://x.example/path", "https://user@x.example"):
        with pytest.raises(ParameterError, match="--origin must read"):
            AccessPolicy(TOKEN, origins=(origin,))


def test_the_pages_own_view_events_pass_the_event_check():
    """Events as trame-rca's page sends them (a key release over the slice view, as chromium
    sent it, carries firstRenderer null): taken; a mistyped field still refused."""
    from InstructX2XModuleLib.web.access import _view_event

    key_up = {
        "w": 998,
        "h": 834,
        "type": "KeyUp",
        "pokedRenderer": 1,
        "firstRenderer": None,
        "key": "ArrowRight",
        "keyCode": 0,
        "controlKey": False,
        "altKey": False,
        "shiftKey": False,
    }
    assert _view_event(key_up)
    assert _view_event({"type": "MouseMove", "x": 10.5, "y": 3, "buttonLeft": True})
    assert not _view_event({**key_up, "firstRenderer": [1]})
    assert not _view_event({"type": "MouseMove", "x": "a", "y": 1})
