"""One self-contained HTML report (plots as inline SVG, no network) and a Markdown summary of a run."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

PALETTE = {"base": "#8c8c8c", "tuned": "#1f6feb", "line": "#1f6feb"}


def read_scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard log directory: name -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(event_dir).is_dir():
        return {}
    events = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high == low:
        return [low]
    return [low + (high - low) * i / count for i in range(count + 1)]


def line_chart(points: list[tuple[int, float]], title: str, width: int = 420, height: int = 220) -> str:
    """An SVG line chart with axes, tick labels and a title."""
    left, right, top, bottom = 52, 12, 28, 34
    if not points:
        return f'<svg class="chart" width="{width}" height="{height}" role="img"><text x="10" y="20">{html.escape(title)}: no data</text></svg>'
    steps = [p[0] for p in points]
    values = [p[1] for p in points]
    x_low, x_high = min(steps), max(steps)
    y_low, y_high = min(values), max(values)
    if y_low == y_high:
        y_low, y_high = y_low - 1, y_high + 1

    def x(step: float) -> float:
        return left + (step - x_low) / max(1, x_high - x_low) * (width - left - right)

    def y(value: float) -> float:
        return top + (1 - (value - y_low) / (y_high - y_low)) * (height - top - bottom)

    path = " ".join(f"{'M' if i == 0 else 'L'}{x(s):.1f},{y(v):.1f}" for i, (s, v) in enumerate(points))
    parts = [f'<svg class="chart" width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" class="title">{html.escape(title)}</text>']
    for tick in _ticks(y_low, y_high):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.3g}</text>')
    x_ticks = range(x_low, x_high + 1) if x_high - x_low <= 10 else sorted({round(t) for t in _ticks(x_low, x_high)})
    for tick in x_ticks:
        parts.append(f'<text x="{x(tick):.1f}" y="{height - 14}" text-anchor="middle">{tick}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 2}" text-anchor="middle" class="axis">step</text>')
    parts.append(f'<path d="{path}" fill="none" stroke="{PALETTE["line"]}" stroke-width="2"/>')
    if len(points) == 1:
        parts.append(f'<circle cx="{x(steps[0]):.1f}" cy="{y(values[0]):.1f}" r="3" fill="{PALETTE["line"]}"/>')
    parts.append("</svg>")
    return "".join(parts)


def histogram(groups: dict[str, list[float]], title: str, bins: int = 12, width: int = 420, height: int = 220) -> str:
    """Overlaid SVG histograms, one colour per group."""
    left, right, top, bottom = 40, 12, 28, 34
    values = [v for vs in groups.values() for v in vs if math.isfinite(v)]
    if not values:
        return f'<svg class="chart" width="{width}" height="{height}"><text x="10" y="20">{html.escape(title)}: no data</text></svg>'
    low, high = min(values), max(values)
    if low == high:
        low, high = low - 0.5, high + 0.5
    counts = {}
    for name, vs in groups.items():
        counts[name] = [0] * bins
        for v in vs:
            counts[name][min(bins - 1, int((v - low) / (high - low) * bins))] += 1
    peak = max(max(c) for c in counts.values()) or 1
    bar_width = (width - left - right) / bins
    parts = [f'<svg class="chart" width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" class="title">{html.escape(title)}</text>']
    for offset, (name, cs) in enumerate(counts.items()):
        colour = PALETTE.get(name, "#444")
        for index, count in enumerate(cs):
            bar_height = count / peak * (height - top - bottom)
            parts.append(f'<rect x="{left + index * bar_width + offset * bar_width / 2:.1f}" '
                         f'y="{height - bottom - bar_height:.1f}" width="{bar_width / 2 - 1:.1f}" '
                         f'height="{bar_height:.1f}" fill="{colour}"><title>{name}: {count}</title></rect>')
        parts.append(f'<rect x="{width - 110}" y="{24 + offset * 16}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{width - 96}" y="{33 + offset * 16}">{html.escape(name)}</text>')
    for tick in _ticks(low, high):
        px = left + (tick - low) / (high - low) * (width - left - right)
        parts.append(f'<text x="{px:.1f}" y="{height - 14}" text-anchor="middle">{tick:.2g}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 2}" text-anchor="middle" class="axis">normalised reward</text>')
    parts.append("</svg>")
    return "".join(parts)


def verdict(evaluation: dict) -> str:
    win = evaluation["win_rate_vs_base"]
    low, high = evaluation.get("win_rate_ci95") or (None, None)
    interval = f" (95% interval {low:.0%}–{high:.0%})" if low is not None else ""
    tuned, base = evaluation["tuned_mean_reward"], evaluation["base_mean_reward"]
    if win > 0.5 and tuned >= base:
        opening = f"The tuned model beats the base model on {win:.0%} of {evaluation['prompts']} prompts{interval}"
    elif win > 0.5:
        opening = (f"The tuned model wins on {win:.0%} of {evaluation['prompts']} prompts{interval} but its mean "
                   "reward is lower")
    else:
        opening = (f"The tuned model does not beat the base model: it wins on {win:.0%} of {evaluation['prompts']} "
                   f"prompts{interval}")
    text = f"{opening}: mean reward {tuned:+.2f} against {base:+.2f}"
    if evaluation.get("kl_to_base") is not None:
        text += f", KL to base {evaluation['kl_to_base']:.2f} nats per completion"
    return (text + f". Tuned completions average {evaluation['tuned_mean_words']:.0f} words, base "
            f"{evaluation['base_mean_words']:.0f}.")


def rule_verdict(evaluation: dict) -> str:
    """The rule judge's sentence, or what stands in for it when the instruction defines no rule."""
    if "rule_pass_rate_tuned" not in evaluation:
        return ("No rule judge: the instruction defines none (one is defined for \"Summarize in less than N "
                "words.\"), so the reward model is the only judge here.")
    tuned, base = evaluation["rule_pass_rate_tuned"], evaluation["rule_pass_rate_base"]
    change = "more" if tuned > base else "fewer" if tuned < base else "as many"
    points = f"{abs(tuned - base) * 100:.0f} points " if tuned != base else ""
    return (f"By the rule ({evaluation['rule']}), {tuned:.0%} of tuned completions pass against {base:.0%} of "
            f"base completions: {points}{change}.")


def _percent(value) -> str:
    return "–" if value is None else f"{value:.0%}"


def judges_table(evaluation: dict) -> list[tuple[str, str, str]]:
    """(measure, base, tuned) rows: the rule's checks, ended shares, words, repetition."""
    rows = []
    if "rule_pass_rate_tuned" in evaluation:
        rows.append(("passes the rule", _percent(evaluation["rule_pass_rate_base"]),
                     _percent(evaluation["rule_pass_rate_tuned"])))
        for check in evaluation["rule_checks_tuned"]:
            rows.append((f"rule: {check.replace('_', ' ')}", _percent(evaluation["rule_checks_base"][check]),
                         _percent(evaluation["rule_checks_tuned"][check])))
    rows.append(("mean reward (reward model)", f"{evaluation['base_mean_reward']:+.2f}",
                 f"{evaluation['tuned_mean_reward']:+.2f}"))
    rows.append(("ended within the token limit", _percent(evaluation.get("base_ended_share")),
                 _percent(evaluation.get("tuned_ended_share"))))
    rows.append(("mean words", f"{evaluation['base_mean_words']:.0f}", f"{evaluation['tuned_mean_words']:.0f}"))
    if "base_repeated_ngram_share" in evaluation:
        rows.append(("repeated word 4-grams", _percent(evaluation["base_repeated_ngram_share"]),
                     _percent(evaluation["tuned_repeated_ngram_share"])))
    return rows


def _rule_cell(judged: dict | None) -> str:
    if judged is None:
        return ""
    return "passes" if judged["passed"] else "fails: " + ", ".join(c.replace("_", " ") for c in judged["failed"])


def _prompt_text(row: dict) -> str:
    return row["input_text"] if "input_text" in row else "\n".join(f"{m['role']}: {m['content']}" for m in row["messages"])


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#1f2328;padding:0 16px}
h1{font-size:1.6em} h2{margin-top:1.6em;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.verdict{font-size:1.15em;background:#f6f8fa;border-left:4px solid #1f6feb;padding:12px 16px}
.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{background:#fff;border:1px solid #d0d7de;border-radius:6px;font-size:11px}
.chart .title{font-size:13px;font-weight:600} .chart .grid{stroke:#eaeef2} .chart .axis{fill:#57606a}
table{border-collapse:collapse;width:100%;font-size:13px} td,th{border:1px solid #d0d7de;padding:6px;vertical-align:top}
th{background:#f6f8fa;cursor:pointer;user-select:none} td.num{text-align:right;white-space:nowrap}
td.prompt{max-width:420px;white-space:pre-wrap} .params td{font-family:ui-monospace,monospace}
table.judges{width:auto;margin:12px 0} td.rule{font-size:12px;color:#57606a}
.gain-pos{color:#1a7f37} .gain-neg{color:#cf222e}
"""

SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function (header, column) {
  header.addEventListener('click', function () {
    var table = header.closest('table'), body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var descending = header.dataset.order !== 'desc';
    header.dataset.order = descending ? 'desc' : 'asc';
    rows.sort(function (a, b) {
      var x = a.cells[column].dataset.value || a.cells[column].textContent;
      var y = b.cells[column].dataset.value || b.cells[column].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var order = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return descending ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def render_html(parameters: dict, metrics: dict, comparison: list[dict], reward_scalars: dict,
                policy_scalars: dict) -> str:
    evaluation = metrics["evaluation"]
    esc = html.escape
    reward_charts = "".join(line_chart(reward_scalars.get(name, []), title)
                            for name, title in (("rank_loss", "Reward model: rank_loss"),
                                                ("accuracy", "Reward model: training accuracy")))
    policy_charts = "".join(line_chart(policy_scalars.get(name, []), title)
                            for name, title in (("reward", "PPO: reward"), ("kl_loss", "PPO: kl_loss"),
                                                ("response_length", "PPO: response length (tokens)")))
    distribution = histogram({"base": [c["base_reward"] for c in comparison],
                              "tuned": [c["tuned_reward"] for c in comparison]}, "Reward: base vs tuned")
    with_rule = "rule_pass_rate_tuned" in evaluation
    rows = []
    for entry in comparison:
        gain = entry["reward_gain"]
        rule_cells = (f'<td class="rule">{esc(_rule_cell(entry.get("base_rule")))}</td>'
                      f'<td class="rule">{esc(_rule_cell(entry.get("tuned_rule")))}</td>') if with_rule else ""
        rows.append(
            f'<tr><td class="prompt">{esc(_prompt_text(entry))}</td><td>{esc(entry["base"])}</td>'
            f'<td>{esc(entry["tuned"])}</td>{rule_cells}'
            f'<td class="num" data-value="{entry["base_reward"]}">{entry["base_reward"]:+.3f}</td>'
            f'<td class="num" data-value="{entry["tuned_reward"]}">{entry["tuned_reward"]:+.3f}</td>'
            f'<td class="num {"gain-pos" if gain > 0 else "gain-neg"}" data-value="{gain}">{gain:+.3f}</td></tr>')
    rule_headers = "<th>base by the rule</th><th>tuned by the rule</th>" if with_rule else ""
    judge_rows = "".join(f"<tr><td>{esc(name)}</td><td class=\"num\">{esc(base)}</td><td class=\"num\">{esc(tuned)}</td></tr>"
                         for name, base, tuned in judges_table(evaluation))
    parameter_rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(json.dumps(v))}</td></tr>"
                             for k, v in sorted(parameters.items()))
    summary_rows = "".join(
        f"<tr><td>{esc(stage)}.{esc(name)}</td><td>{esc(json.dumps(value))}</td></tr>"
        for stage in ("reward_model", "policy", "evaluation") for name, value in metrics.get(stage, {}).items()
        if not isinstance(value, dict))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>RLHF run report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body>
<h1>RLHF run report</h1>
<p class="verdict" id="verdict">{esc(verdict(evaluation))}</p>
<p class="verdict" id="rule-verdict">{esc(rule_verdict(evaluation))}</p>
<table class="judges" id="judges"><thead><tr><th>base vs tuned on the evaluation prompts</th><th>base</th>
<th>tuned</th></tr></thead><tbody>{judge_rows}</tbody></table>
<h2>Base vs tuned, side by side</h2>
<p>Ordered by reward gain (tuned minus base); click a column header to sort.</p>
<table class="sortable" id="side-by-side"><thead><tr><th>prompt</th><th>base</th><th>tuned</th>{rule_headers}
<th>base reward</th><th>tuned reward</th><th>gain</th></tr></thead><tbody>{''.join(rows)}</tbody></table>
<h2>Reward model</h2><div class="charts" id="reward-model-charts">{reward_charts}</div>
<h2>Reinforcement learning (PPO)</h2><div class="charts" id="policy-charts">{policy_charts}</div>
<h2>Rewards on the evaluation prompts</h2><div class="charts" id="reward-distribution">{distribution}</div>
<h2>Metrics</h2><table class="params"><tbody>{summary_rows}</tbody></table>
<h2>Run parameters</h2><table class="params"><tbody>{parameter_rows}</tbody></table>
<script>{SORT_SCRIPT}</script>
</body></html>
"""


def render_markdown(metrics: dict, comparison: list[dict], limit: int = 10) -> str:
    evaluation = metrics["evaluation"]
    lines = ["# RLHF run report", "", verdict(evaluation), "", rule_verdict(evaluation), "",
             "| on the evaluation prompts | base | tuned |", "|---|---|---|"]
    lines += [f"| {name} | {base} | {tuned} |" for name, base, tuned in judges_table(evaluation)]
    lines += ["", "| metric | value |", "|---|---|"]
    for stage in ("reward_model", "policy", "evaluation"):
        for name, value in metrics.get(stage, {}).items():
            if not isinstance(value, dict):
                lines.append(f"| {stage}.{name} | {json.dumps(value)} |")
    lines += ["", f"## Largest reward gains (of {len(comparison)})", "", "| prompt | base | tuned | gain |", "|---|---|---|---|"]

    def cell(text: str) -> str:
        text = text.replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= 160 else text[:157] + "..."

    for entry in comparison[:limit]:
        lines.append(f"| {cell(_prompt_text(entry))} | {cell(entry['base'])} | {cell(entry['tuned'])} | "
                     f"{entry['reward_gain']:+.3f} |")
    return "\n".join(lines) + "\n"
