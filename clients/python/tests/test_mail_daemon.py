"""mail.* against the real daemon. Skipped, loudly, while the daemon's hello does not
list mail.send; these start running once the mail ops land. The daemon uses the file
transport into this module's temp dir (``<mail_id>.eml`` per delivered mail).

Written against the mail branch's code as of its first commit and not yet run against a
daemon that has the ops: adjust here if the merged ops differ."""

from __future__ import annotations

import os
import time

import pytest

from conftest import LOUD_SKIPS, Stack, eventually
from satchel_client import Client, SatchelError

REASON = "the daemon does not offer mail.send (hello ops lacks it); Python mail tests need the mail ops"


@pytest.fixture(scope="module")
def stack():
    s = Stack(lambda d: {"SATCHEL_MAIL_TRANSPORT": "file", "SATCHEL_MAIL_FILE_DIR": os.path.join(d, "mail")})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack):
    c = Client(stack.socket)
    if not c.supports("mail.send"):
        LOUD_SKIPS.append(REASON)
        print(f"\n*** SKIPPED: {REASON} ***")
        c.close()
        pytest.skip(f"SKIPPED: {REASON}")
    yield c
    c.close()


def test_queued_mail_is_delivered(stack, client):
    r = client.mail.send("student@example.test", "Results", text="out",
                         attachments=[("r.txt", "text/plain", b"91/100")])
    assert isinstance(r["mail_id"], str) and r["duplicate"] is False
    eventually("the mail to be sent", lambda: client.mail.status(r["mail_id"])["status"] == "sent")
    assert os.path.exists(os.path.join(stack.dir, "mail", f"{r['mail_id']}.eml"))


def test_idempotency_key_returns_the_first_mail(client):
    first = client.mail.send("student@example.test", "Results", text="out", idempotency_key="py-k-1")
    again = client.mail.send("student@example.test", "Results", text="out", idempotency_key="py-k-1")
    assert (again["mail_id"], again["duplicate"]) == (first["mail_id"], True)


def test_scheduled_mail_can_be_cancelled(client):
    r = client.mail.send("a@example.test", "later", text="t", send_at_ms=int(time.time() * 1000) + 3_600_000)
    assert client.mail.cancel(r["mail_id"])["cancelled"] is True
    assert client.mail.status(r["mail_id"])["status"] == "cancelled"


def test_errors_carry_their_codes(client):
    with pytest.raises(SatchelError) as e:
        client.mail.send([], "s", text="t")
    assert (e.value.code, e.value.field) == ("INVALID_MAIL", "to")
    with pytest.raises(SatchelError) as e:
        client.mail.status("no-such-mail")
    assert e.value.code == "NOT_FOUND"
    r = client.mail.send("a@example.test", "later", text="t", send_at_ms=int(time.time() * 1000) + 3_600_000)
    with pytest.raises(SatchelError) as e:
        client.mail.retry(r["mail_id"])
    assert (e.value.code, e.value.field) == ("BAD_REQUEST", "mail_id")


def test_dead_lists(client):
    assert isinstance(client.mail.dead(limit=5), list)


def _statuses(events, mail_id):
    return [e["status"] for e in events if e["mail_id"] == mail_id]


def test_events_iterate_in_order_and_resume_from_the_cursor(client):
    # From now on: nothing yet.
    now = client.mail.events(follow=False)
    assert list(now) == []
    start = now.cursor
    r = client.mail.send("student@example.test", "Results", text="out")
    eventually("the mail to be sent", lambda: client.mail.status(r["mail_id"])["status"] == "sent")
    stream = client.mail.events(since=start, follow=False)
    events = list(stream)
    assert _statuses(events, r["mail_id"]) == ["queued", "sending", "sent"]
    assert stream.cursor == events[-1]["event_id"]
    # Resuming from the cursor repeats nothing; a new mail's events follow.
    again = client.mail.events(since=stream.cursor, follow=False)
    assert list(again) == []
    later = client.mail.send("a@example.test", "later", text="t", send_at_ms=int(time.time() * 1000) + 3_600_000)
    client.mail.cancel(later["mail_id"])
    following = client.mail.events(since=stream.cursor)  # follow: long-polls
    first, second = next(following), next(following)
    assert [first["status"], second["status"]] == ["scheduled", "cancelled"]
    assert following.cursor == second["event_id"]


def test_events_with_a_bad_cursor_are_a_bad_request(client):
    with pytest.raises(SatchelError) as e:
        list(client.mail.events(since="garbage", follow=False))
    assert (e.value.code, e.value.field) == ("BAD_REQUEST", "since")


def test_async_events_iterate_and_resume(stack):
    import asyncio

    from satchel_client import AsyncClient

    async def run():
        c = AsyncClient(stack.socket)
        try:
            head = c.mail.events(follow=False)
            assert [e async for e in head] == []
            r = await c.mail.send("b@example.test", "Async", text="x")
            seen = []
            async for e in c.mail.events(since=head.cursor):
                if e["mail_id"] == r["mail_id"]:
                    seen.append(e["status"])
                if seen and seen[-1] == "sent":
                    break
            assert seen == ["queued", "sending", "sent"]
        finally:
            await c.close()

    asyncio.run(run())


def test_suppression_list_add_send_list_remove(client):
    client.mail.suppression.add("Gone@Example.COM", reason="left the school")
    r = client.mail.send("Gone@example.com", "s", text="t")
    assert (r["status"], r["suppressed"]) == ("suppressed", ["Gone@example.com"])
    page = client.mail.suppression.list()
    assert "cursor" not in page
    entry = [e for e in page["entries"] if e["address"] == "Gone@example.com"][0]
    assert (entry["class"], entry["reason"]) == ("manual", "left the school")
    assert client.mail.suppression.remove("Gone@example.com") == {"removed": True}
    assert client.mail.suppression.remove("Gone@example.com") == {"removed": False}
    with pytest.raises(SatchelError) as e:
        client.mail.suppression.add("a@b.c\r\nRCPT TO:<x@y>")
    assert (e.value.code, e.value.field) == ("BAD_REQUEST", "address")


def test_templates_put_send_get_list_delete(stack, client):
    client.mail.template.put("py-results", "Results for {{ name }}", html="<p>{{ name }}: {{ score }}</p>")
    assert "py-results" in client.mail.template.list()
    assert client.mail.template.get("py-results")["subject"] == "Results for {{ name }}"
    r = client.mail.send("a@example.test", template="py-results", vars={"name": "<b>Ann</b>", "score": 91})
    eventually("the mail to be sent", lambda: client.mail.status(r["mail_id"])["status"] == "sent")
    with open(os.path.join(stack.dir, "mail", f"{r['mail_id']}.eml")) as f:
        eml = f.read()
    assert "&lt;b&gt;Ann&lt;&#x2f;b&gt;: 91" in eml
    with pytest.raises(SatchelError) as e:
        client.mail.send("a@example.test", template="py-results", vars={"name": "x"})
    assert (e.value.code, e.value.field) == ("INVALID_MAIL", "vars")
    assert client.mail.template.delete("py-results") == {"deleted": True}
