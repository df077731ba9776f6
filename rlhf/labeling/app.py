"""The labelling page: a small Flask app that shows one pair at a time and records each decision in a
LabelStore before answering, so what the page shows next is always what is already on disk.

The browser is only told "left", "right" or "skip"; which stored candidate sits on which side is decided
and mapped back here (rlhf.labeling.labels.screen_order), so the page cannot leak or bias `choice`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

from rlhf.data.pairs import prompt_fields
from rlhf.errors import UserError
from rlhf.labeling.labels import LabelStore, annotator_progress, next_pair, screen_order

PICKS = ("left", "right", "skip")
LOOPBACK_HOSTNAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_HOSTNAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless asked explicitly: the page has no login, so anyone who can
    reach it can label in the annotator's name."""
    if not is_loopback(host) and not allow_remote:
        raise UserError(f"--host {host} is not a loopback address: anyone who reaches it could label in your "
                         "name. Add --allow-remote if that is what you want")


class LabelingSession:
    """One annotator working through the pairs of one file, into one labels file."""

    def __init__(self, pairs: list[dict], store: LabelStore, annotator: str):
        self.pairs = pairs
        self.by_id = {pair["pair_id"]: pair for pair in pairs}
        self.store = store
        self.annotator = annotator

    def state(self) -> dict:
        """Progress, and the next pair as the page shows it (None when every pair is decided)."""
        counts = annotator_progress(self.pairs, self.store.labels).get(
            self.annotator, {"chosen": 0, "skipped": 0, "remaining": len(self.pairs)})
        index = next_pair(self.pairs, self.store.labels, self.annotator)
        return {"annotator": self.annotator, "total": len(self.pairs), **counts,
                "pair": None if index is None else self._shown(self.pairs[index])}

    def _shown(self, pair: dict) -> dict:
        ended = pair.get("generation", {}).get("ended") if isinstance(pair.get("generation"), dict) else None
        sides = {}
        for side, stored in zip(("left", "right"), screen_order(pair["pair_id"], self.annotator)):
            cut = isinstance(ended, list) and len(ended) == 2 and ended[stored] is False
            sides[side] = {"text": pair[f"candidate_{stored}"], "cut": cut}
        return {"pair_id": pair["pair_id"], **prompt_fields(pair), **sides}

    def decide(self, pair_id: str, pick: str) -> dict:
        if pair_id not in self.by_id:
            raise KeyError(pair_id)
        left, right = screen_order(pair_id, self.annotator)
        choice = None if pick == "skip" else (left if pick == "left" else right)
        self.store.record(pair_id, self.annotator, choice, left)
        return self.state()


def create_app(session: LabelingSession, loopback_only: bool):
    from flask import Flask, jsonify, render_template, request

    app = Flask(__name__)

    @app.before_request
    def refuse_foreign_host():
        # A web page elsewhere can point its own domain name at 127.0.0.1 (DNS rebinding) and then read
        # and post here; the Host header it must send gives it away.
        if loopback_only and not is_loopback(urlsplit("//" + request.host).hostname or ""):
            return jsonify(error=f"host {request.host} is not served here"), 403
        return None

    @app.get("/")
    def page():
        return render_template("labeling.html", annotator=session.annotator)

    @app.get("/api/state")
    def state():
        return jsonify(session.state())

    @app.post("/api/label")
    def label():
        # get_json refuses anything but application/json, which another site's form cannot send here.
        body = request.get_json()
        if not isinstance(body, dict) or body.get("pick") not in PICKS or not isinstance(body.get("pair_id"), str):
            return jsonify(error='expected {"pair_id": "...", "pick": "left" | "right" | "skip"}'), 400
        try:
            return jsonify(session.decide(body["pair_id"], body["pick"]))
        except KeyError:
            return jsonify(error=f"no pair {body['pair_id']!r} in this pairs file"), 404

    return app


def serve(session: LabelingSession, host: str, port: int, allow_remote: bool, say: Callable[[str], None]) -> None:
    """Serve the page until Ctrl-C."""
    from werkzeug.serving import make_server

    check_host(host, allow_remote)
    # One line per request would bury the URL and the progress lines.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    try:
        server = make_server(host, port, create_app(session, loopback_only=not allow_remote), threaded=True)
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    shown_host = f"[{host}]" if ":" in host else host
    state = session.state()
    say(f"Labelling page: http://{shown_host}:{server.server_port}/ (annotator {session.annotator!r}, "
        f"{state['chosen'] + state['skipped']} of {state['total']} pairs decided). Every label is saved at once "
        f"to {session.store.path}; Ctrl-C stops.")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        session.store.close()
    say(f"Stopped. Labels are in {session.store.path}")
