"""mail.* request encoding against a stand-in daemon (the real one lacks the mail ops
for now; test_mail_daemon.py covers the real thing once they land)."""

from __future__ import annotations

import asyncio

import pytest

from fake_daemon import FakeDaemon
from satchel_client import AsyncClient, Client, SatchelError


def handler(req):
    op = req["op"]
    if op == "mail.send":
        return {"ok": True, "result": {"mail_id": "m-1", "status": "queued", "duplicate": False}}
    if op == "mail.status":
        return {"ok": True, "result": {"mail_id": req["mail_id"], "status": "sent", "attempts": 1, "updated_ms": 3}}
    if op == "mail.cancel":
        return {"ok": True, "result": {"cancelled": False}}
    if op == "mail.retry":
        return {"ok": False, "error": {"code": "NOT_FOUND", "message": "no such mail"}}
    if op == "mail.dead":
        return {"ok": True, "result": []}
    return {"ok": False, "error": {"code": "UNKNOWN_OP", "message": "?", "field": "op"}}


@pytest.fixture()
def fake():
    f = FakeDaemon(handler)
    yield f
    f.close()


def test_mail_send_encodes_every_field(fake):
    with Client(fake.socket) as c:
        r = c.mail.send(
            "student@example.test",
            "Results published",
            cc=["a@example.test"],
            from_="exams@example.test",
            reply_to="office@example.test",
            text="out",
            html="<p>out</p>",
            headers={"X-Exam-Id": "42"},
            attachments=[{"filename": "r.pdf", "content_type": "application/pdf", "data": b"%PDF"},
                         ("a.txt", "text/plain", "hi")],
            idempotency_key="results:42:7",
            send_at_ms=1700000000000,
        )
    assert r == {"mail_id": "m-1", "status": "queued", "duplicate": False}
    req = fake.requests[-1]
    assert req["op"] == "mail.send"
    assert req["to"] == ["student@example.test"]
    assert req["from"] == "exams@example.test"
    assert req["reply_to"] == "office@example.test"
    assert req["idempotency_key"] == "results:42:7"
    assert req["send_at_ms"] == 1700000000000
    assert req["headers"] == {"X-Exam-Id": "42"}
    assert req["attachments"][0] == {"filename": "r.pdf", "content_type": "application/pdf", "data": b"%PDF"}
    assert req["attachments"][1]["data"] == b"hi"
    assert "bcc" not in req


def test_mail_status_cancel_retry_dead(fake):
    with Client(fake.socket) as c:
        assert c.mail.status("m-1")["status"] == "sent"
        assert fake.requests[-1] == {"id": fake.requests[-1]["id"], "op": "mail.status", "mail_id": "m-1"}
        assert c.mail.cancel("m-1") == {"cancelled": False}
        with pytest.raises(SatchelError) as e:
            c.mail.retry("nope")
        assert e.value.code == "NOT_FOUND"
        assert c.mail.dead(limit=3) == []
        assert fake.requests[-1]["limit"] == 3


def test_async_mail_send_encodes_the_same(fake):
    async def main():
        async with AsyncClient(fake.socket) as c:
            return await c.mail.send(["x@example.test"], "s", text="t", idempotency_key="k")

    assert asyncio.run(main())["mail_id"] == "m-1"
    req = fake.requests[-1]
    assert (req["to"], req["subject"], req["text"], req["idempotency_key"]) == (["x@example.test"], "s", "t", "k")
