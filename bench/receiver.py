"""The notify benchmark's webhook receiver, in a process of its own so that its threads never
wait for the harness's GIL:

    python -m bench.receiver

tests/receiver.py's Receiver (each request stamped with time.monotonic_ns() as it is read),
reported as "H at_ns signature_ok type session_id" once stamped. "READY url" first; EOF on
stdin ends it.
"""

from __future__ import annotations

import base64
import sys
import threading

from bench.harness import ROOT
from bench.lines import say

NOTIFY_SECRET = "whsec_" + base64.b64encode(b"the notify benchmark's key, not a secret").decode()


def receiver_role() -> None:
    """Report each request as it arrives (see the module's docstring) until EOF."""
    sys.path.insert(0, str(ROOT / "tests"))
    from receiver import Receiver, standard_signature_ok  # type: ignore[import-not-found]

    eof = threading.Event()
    with Receiver() as receiver:
        def wait_for_eof() -> None:
            sys.stdin.buffer.read()
            eof.set()
            with receiver.arrived:
                receiver.arrived.notify_all()

        threading.Thread(target=wait_for_eof, name="receiver-stdin", daemon=True).start()
        say(f"READY {receiver.url}")
        reported = [0]
        while True:
            with receiver.arrived:
                receiver.arrived.wait_for(lambda: len(receiver.requests) > reported[0] or eof.is_set())
                new = receiver.requests[reported[0]:]
            if not new:
                break  # EOF, and everything said
            for request in new:
                body = request.json
                ok = standard_signature_ok(request, NOTIFY_SECRET)
                say(f"H {request.at_ns} {int(ok)} {body.get('type')} {body.get('session_id')}")
            reported[0] += len(new)


if __name__ == "__main__":
    receiver_role()
