"""The garbage collector in a serving process (uvworker/collector.py): what the app sees.

The app reports the collector's state in its response: once the app is loaded the server
has frozen what exists and raised the first threshold; an app that set its own threshold
when it was imported keeps it.
"""

from __future__ import annotations

import gc
import json
import os
import urllib.request

import pytest

from tests.test_cli import listening, running
from uvworker.collector import GEN0_THRESHOLD

OWN_THRESHOLD = os.environ.get("TEST_COLLECTOR_THRESHOLD")
if OWN_THRESHOLD:  # the app's own choice, made at import (only in the server process)
    gc.set_threshold(int(OWN_THRESHOLD))


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    state = {"threshold": gc.get_threshold()[0], "frozen": gc.get_freeze_count()}
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(state).encode()})


def collector_state(env: dict[str, str] | None = None) -> dict[str, int]:
    with listening() as sock:
        fd = sock.fileno()
        host, port = sock.getsockname()
        with running("tests.test_collector:app", "--fd", str(fd), "--no-access-log", env=env, pass_fds=[fd]):
            with urllib.request.urlopen(f"http://{host}:{port}/", timeout=10) as response:
                return json.loads(response.read())


@pytest.mark.skipif(gc.get_threshold()[0] not in (700, 2000), reason="this interpreter's collector is not CPython's default")
def test_the_collector_is_tuned_once_the_app_is_loaded() -> None:
    state = collector_state()
    assert state["threshold"] == GEN0_THRESHOLD
    assert state["frozen"] > 1000  # the app's module, its imports and the server's own objects


def test_an_apps_own_collector_settings_win() -> None:
    state = collector_state({"TEST_COLLECTOR_THRESHOLD": "1234"})
    assert state == {"threshold": 1234, "frozen": 0}
