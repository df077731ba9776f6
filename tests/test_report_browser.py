"""The report in a real headless Chromium (Debian's, installed by the test command): no console errors,
the plots and the side-by-side table are drawn, and sorting works."""

import io
import os

import pytest

from rlhf.evaluation.report import render_html
from tests.conftest import BROWSER_FLAGS, CHROMIUM, EVALUATION

pytestmark = pytest.mark.browser

if not CHROMIUM and not os.environ.get("CI"):
    pytest.skip("Chromium is not installed (`make test` installs it)", allow_module_level=True)


def report_page(tmp_path):
    comparison = [{"input_text": f"post {i}", "base": f"base {i}", "tuned": f"tuned {i}", "base_reward": i / 10,
                   "tuned_reward": (i % 3) / 5, "reward_gain": (i % 3) / 5 - i / 10} for i in range(6)]
    comparison.sort(key=lambda c: -c["reward_gain"])
    metrics = {"reward_model": {"eval_accuracy": 0.7}, "policy": {"final_reward": 0.3},
               "evaluation": {**EVALUATION, "prompts": 6}}
    page = render_html({"kl_coeff": 0.1}, metrics, comparison,
                       {"rank_loss": [(s, 0.7 - s / 50) for s in range(1, 21)],
                        "accuracy": [(s, 0.5 + s / 50) for s in range(1, 21)]},
                       {"reward": [(s, s / 10) for s in range(1, 11)], "kl_loss": [(s, s / 100) for s in range(1, 11)],
                        "response_length": [(s, 40 - s) for s in range(1, 11)]})
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def distinct_colours(png: bytes) -> int:
    from PIL import Image

    return len(set(Image.open(io.BytesIO(png)).convert("RGB").getdata()))


def test_report_renders_without_errors_with_plots_and_table(tmp_path):
    from playwright.sync_api import sync_playwright

    path = report_page(tmp_path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1800})
        problems = []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("request", lambda request: problems.append(f"network: {request.url}")
                if not request.url.startswith("file://") else None)
        page.goto(path.as_uri())
        charts = page.locator("svg.chart")
        assert charts.count() == 6
        for index in range(charts.count()):
            box = charts.nth(index).bounding_box()
            assert box["width"] > 300 and box["height"] > 150
            assert distinct_colours(charts.nth(index).screenshot()) > 3  # axes, labels and a line or bars
        rows = page.locator("#side-by-side tbody tr")
        assert rows.count() == 6
        gains = [float(v) for v in page.locator("#side-by-side tbody td:nth-child(6)").all_inner_texts()]
        assert gains == sorted(gains, reverse=True)
        page.locator("#side-by-side th", has_text="base reward").click()
        base = [float(v) for v in page.locator("#side-by-side tbody td:nth-child(4)").all_inner_texts()]
        assert base == sorted(base, reverse=True)
        assert page.locator("#verdict").inner_text().startswith("The tuned model beats the base model")
        screenshot = page.screenshot(full_page=True)
        (tmp_path / "report.png").write_bytes(screenshot)
        assert distinct_colours(screenshot) > 20
        browser.close()
    assert problems == []
