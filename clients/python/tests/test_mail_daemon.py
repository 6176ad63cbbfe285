"""mail.* against the real daemon. Skipped, loudly, while the daemon's hello does not
list mail.send; these start running once the mail ops land."""

from __future__ import annotations

import pytest

from conftest import LOUD_SKIPS
from satchel_client import Client, SatchelError

REASON = "the daemon does not offer mail.send (hello ops lacks it); Python mail tests need the mail ops"


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


def test_send_is_idempotent_and_status_finds_it(client):
    r = client.mail.send("student@example.test", "Results", text="out", idempotency_key="py-k-1")
    assert isinstance(r["mail_id"], str) and r["duplicate"] is False
    again = client.mail.send("student@example.test", "Results", text="out", idempotency_key="py-k-1")
    assert (again["mail_id"], again["duplicate"]) == (r["mail_id"], True)
    assert client.mail.status(r["mail_id"])["mail_id"] == r["mail_id"]


def test_send_without_recipients_is_invalid_mail(client):
    with pytest.raises(SatchelError) as e:
        client.mail.send([], "s", text="t")
    assert (e.value.code, e.value.field) == ("INVALID_MAIL", "to")


def test_status_of_unknown_mail_is_not_found(client):
    with pytest.raises(SatchelError) as e:
        client.mail.status("no-such-mail")
    assert e.value.code == "NOT_FOUND"


def test_dead_lists(client):
    assert isinstance(client.mail.dead(limit=5), list)
