"""The labelling page end to end in a real headless Chromium (Debian's, installed by the test command),
against the real `rlhf label` server: pick by click and by key, skip, reload, kill the server with SIGKILL,
start it again, finish, and check the export holds exactly what was chosen on screen."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from rlhf.data.validation import read_dataset
from tests.conftest import BROWSER_FLAGS, CHROMIUM, free_port, rlhf

pytestmark = pytest.mark.browser

if not CHROMIUM and not os.environ.get("CI"):
    pytest.skip("Chromium is not installed (`make test` installs it)", allow_module_level=True)

ANNOTATOR = "tess"
PAIRS = [
    {"pair_id": f"pair-{n}", "input_text": f"Post {n}: my neighbour's dog barks every night, {n} weeks now.",
     "candidate_0": f"The dog of post {n} barks at night.", "candidate_1": f"Post {n} is about a noisy neighbour."}
    for n in range(1, 6)
]


def start_server(pairs, labels, port):
    process = subprocess.Popen(
        [sys.executable, "-m", "rlhf.cli", "label", "--pairs", str(pairs), "--output", str(labels),
         "--annotator", ANNOTATOR, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{process.stdout.read()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=1).read()
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    pytest.fail("the server did not answer within 60 s")


def shown(page) -> dict:
    return {"pair_id": page.locator("#task").get_attribute("data-pair-id"),
            "prompt": page.locator("#prompt").inner_text(),
            "left": page.locator("#left .text").inner_text(), "right": page.locator("#right .text").inner_text()}


def wait_past(page, pair_id):
    page.wait_for_function("id => document.getElementById('task').dataset.pairId !== id"
                           " || !document.getElementById('done').hidden", arg=pair_id)


def test_labels_by_click_and_key_survive_reload_and_kill_and_export_exactly(tmp_path):
    from playwright.sync_api import sync_playwright

    pairs_file, labels_file, export = tmp_path / "pairs.jsonl", tmp_path / "labels.jsonl", tmp_path / "prefs.jsonl"
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    by_id = {p["pair_id"]: p for p in PAIRS}
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    chosen_text, screens = {}, []
    server = start_server(pairs_file, labels_file, port)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            problems = []
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("request", lambda request: problems.append(f"network: {request.url}")
                    if not request.url.startswith(url) else None)
            page.goto(url)
            page.wait_for_selector("#task:not([hidden])")

            def decide(action):
                screen = shown(page)
                screens.append(screen)
                assert screen["prompt"] == by_id[screen["pair_id"]]["input_text"]
                assert {screen["left"], screen["right"]} == {by_id[screen["pair_id"]]["candidate_0"],
                                                             by_id[screen["pair_id"]]["candidate_1"]}
                action()
                wait_past(page, screen["pair_id"])
                return screen

            first = decide(lambda: page.locator("#left").click())
            chosen_text[first["pair_id"]] = first["left"]
            second = decide(lambda: page.keyboard.press("2"))
            chosen_text[second["pair_id"]] = second["right"]
            decide(lambda: page.locator("#skip").click())
            assert page.locator("#progress").inner_text() == "3 of 5 decided (1 skipped)"

            before_reload = shown(page)
            page.reload()
            page.wait_for_selector("#task:not([hidden])")
            assert shown(page) == before_reload  # same pair, same sides
            fourth = decide(lambda: page.keyboard.press("1"))
            chosen_text[fourth["pair_id"]] = fourth["left"]
            assert len(labels_file.read_text().splitlines()) == 4

            server.send_signal(signal.SIGKILL)
            server.wait()
            server = start_server(pairs_file, labels_file, port)
            page.reload()
            page.wait_for_selector("#task:not([hidden])")
            assert page.locator("#progress").inner_text() == "4 of 5 decided (1 skipped)"
            fifth = decide(lambda: page.locator("#right").click())
            chosen_text[fifth["pair_id"]] = fifth["right"]
            page.wait_for_selector("#done:not([hidden])")
            assert page.locator("#progress").inner_text() == "5 of 5 decided (1 skipped)"
            browser.close()
        assert problems == []
    finally:
        server.kill()
        server.wait()

    assert [s["pair_id"] for s in screens] == [p["pair_id"] for p in PAIRS]
    # The page showed some pairs the other way round, so mapping back is put to the test.
    assert any(s["left"] == by_id[s["pair_id"]]["candidate_1"] for s in screens)
    assert any(s["left"] == by_id[s["pair_id"]]["candidate_0"] for s in screens)

    result = rlhf("label", "--pairs", str(pairs_file), "--output", str(labels_file), "--export", str(export))
    assert result.returncode == 0, result.stderr
    expected = [{"input_text": p["input_text"], "candidate_0": p["candidate_0"], "candidate_1": p["candidate_1"],
                 "choice": [p["candidate_0"], p["candidate_1"]].index(chosen_text[p["pair_id"]])}
                for p in PAIRS if p["pair_id"] in chosen_text]
    assert [json.loads(line) for line in export.read_text().splitlines()] == expected
    assert len(expected) == 4
    assert read_dataset(str(export), "preference").problems == []
    labels = [json.loads(line) for line in labels_file.read_text().splitlines()]
    assert [label["annotator"] for label in labels] == [ANNOTATOR] * 5
    assert [label.get("skipped", False) for label in labels] == [False, False, True, False, False]
    for label, screen in zip(labels, screens):
        assert by_id[label["pair_id"]][f"candidate_{label['left']}"] == screen["left"]
