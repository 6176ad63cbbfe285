#!/usr/bin/env python3
"""An independent DKIM verifier for satchel's tests: dkimpy (PyPI), with the public
keys served by a DNS function instead of DNS.

Reads JSON from stdin: {"records": {"<selector>._domainkey.<domain>": "v=DKIM1; …"},
"messages": ["<raw message>", …]} and prints one JSON line with a result per
message: {"signed", "verified", "from_added_top", "from_added_bottom",
"subject_changed", "reply_to_added", "body_changed"} (each tampered copy's verification result).
"""

import json
import re
import sys

import dkim


def main():
    req = json.load(sys.stdin)
    records = {k.lower().rstrip("."): v for k, v in req["records"].items()}

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        return records.get(name.lower().rstrip("."), "").encode()

    def verify(raw):
        return bool(dkim.verify(raw, dnsfunc=dnsfunc))

    results = []
    for text in req["messages"]:
        # A maildir file (Postfix) has LF line ends; the wire had CRLF.
        raw = re.sub(rb"\r?\n", b"\r\n", text.encode())
        head, sep, body = raw.partition(b"\r\n\r\n")
        results.append({
            "signed": b"DKIM-Signature:" in head,
            "verified": verify(raw),
            "from_added_top": verify(b"From: mallory@attacker.example\r\n" + raw),
            "from_added_bottom": verify(head + b"\r\nFrom: mallory@attacker.example" + sep + body),
            "subject_changed": verify(raw.replace(b"\r\nSubject: ", b"\r\nSubject: Re: ", 1)),
            "reply_to_added": verify(head + b"\r\nReply-To: mallory@attacker.example" + sep + body),
            "body_changed": verify(head + sep + body + b"extra line\r\n"),
        })
    print(json.dumps(results))


if __name__ == "__main__":
    main()
