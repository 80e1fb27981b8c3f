"""The control socket answers every request, however hostile, and never dies of one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ControlError
from agent.runtime import control


async def _ask(path: Path, line: bytes) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(line + b"\n")
    await writer.drain()
    reply = json.loads(await reader.readline())
    writer.close()
    await writer.wait_closed()
    return reply  # type: ignore[no-any-return]


@pytest.mark.asyncio
async def test_deep_oversized_and_failing_requests_are_each_answered(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    calls: list[dict[str, Any]] = []

    def handler(request: dict[str, Any]) -> dict[str, Any]:
        calls.append(request)
        if request.get("verb") == "boom":
            raise RecursionError("a bug of ours")
        return {"verb": request.get("verb")}

    server = await control.serve(path, handler)
    try:
        deep = b'{"verb": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
        reply = await _ask(path, deep)
        assert reply == {"ok": False, "error": "request nested 30001 deep, at most 16"}
        reply = await _ask(path, b"[1, 2]")
        assert reply == {"ok": False, "error": "a request is a JSON object"}
        reply = await _ask(path, b'{"verb": "boom"}')
        assert reply == {"ok": False, "error": "internal error (RecursionError), logged"}
        assert await _ask(path, b'{"verb": "status"}') == {"ok": True, "result": {"verb": "status"}}
        assert [c["verb"] for c in calls] == ["boom", "status"]  # the deep one never parsed
    finally:
        server.close()
        await server.wait_closed()


def test_decode_refuses_what_is_not_one_flat_object() -> None:
    with pytest.raises(ControlError, match="too large"):
        control._decode(b"{" + b" " * control.MAX_REQUEST + b"}")
    with pytest.raises(ControlError, match="one JSON object"):
        control._decode(b"{not json")
    assert control._decode(b'{"verb": "status", "x": [1, {"y": 2}]}')["verb"] == "status"
