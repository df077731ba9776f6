"""One self-contained HTML report (plots as inline SVG, no network) and a Markdown summary of a run."""

from __future__ import annotations

import json
import math
from functools import lru_cache
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


@lru_cache(maxsize=1)
def _templates():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    return Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                       autoescape=select_autoescape(["html"]), undefined=StrictUndefined)


def line_chart_geometry(points: list[tuple[int, float]], title: str, width: int = 420, height: int = 220) -> dict:
    """Where a line chart's ticks, labels and path go, in pixels; the template draws them."""
    left, right, top, bottom = 52, 12, 28, 34
    chart = {"title": title, "width": width, "height": height, "left": left, "right": right,
             "colour": PALETTE["line"], "empty": not points}
    if not points:
        return chart
    steps = [p[0] for p in points]
    values = [p[1] for p in points]
    x_low, x_high = min(steps), max(steps)
    y_low, y_high = min(values), max(values)
    if y_low == y_high:
        y_low, y_high = y_low - 1, y_high + 1

    def x(step: float) -> float:
        return round(left + (step - x_low) / max(1, x_high - x_low) * (width - left - right), 1)

    def y(value: float) -> float:
        return round(top + (1 - (value - y_low) / (y_high - y_low)) * (height - top - bottom), 1)

    x_ticks = range(x_low, x_high + 1) if x_high - x_low <= 10 else sorted({round(t) for t in _ticks(x_low, x_high)})
    chart.update(
        y_ticks=[(y(tick), f"{tick:.3g}") for tick in _ticks(y_low, y_high)],
        x_ticks=[(x(tick), str(tick)) for tick in x_ticks],
        path=" ".join(f"{'M' if i == 0 else 'L'}{x(s)},{y(v)}" for i, (s, v) in enumerate(points)),
        dot=(x(steps[0]), y(values[0])) if len(points) == 1 else None)
    return chart


def histogram_geometry(groups: dict[str, list[float]], title: str, bins: int = 12, width: int = 420,
                       height: int = 220) -> dict:
    """Overlaid histograms, one colour per group: each bar's place and size in pixels."""
    left, right, top, bottom = 40, 12, 28, 34
    values = [v for vs in groups.values() for v in vs if math.isfinite(v)]
    chart = {"title": title, "width": width, "height": height, "empty": not values}
    if not values:
        return chart
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
    bars, legend = [], []
    for offset, (name, cs) in enumerate(counts.items()):
        colour = PALETTE.get(name, "#444")
        for index, count in enumerate(cs):
            bar_height = count / peak * (height - top - bottom)
            bars.append({"x": round(left + index * bar_width + offset * bar_width / 2, 1),
                         "y": round(height - bottom - bar_height, 1), "width": round(bar_width / 2 - 1, 1),
                         "height": round(bar_height, 1), "colour": colour, "group": name, "count": count})
        legend.append({"y": 24 + offset * 16, "colour": colour, "group": name})
    chart.update(bars=bars, legend=legend,
                 x_ticks=[(round(left + (tick - low) / (high - low) * (width - left - right), 1), f"{tick:.2g}")
                          for tick in _ticks(low, high)])
    return chart


def line_chart(points: list[tuple[int, float]], title: str) -> str:
    """An SVG line chart with axes, tick labels and a title."""
    return str(_templates().get_template("charts.html").module.line_chart(line_chart_geometry(points, title)))


def histogram(groups: dict[str, list[float]], title: str) -> str:
    """Overlaid SVG histograms, one colour per group."""
    return str(_templates().get_template("charts.html").module.histogram(histogram_geometry(groups, title)))


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
        sampling = evaluation.get("kl_to_base_sampling") or {}
        if sampling.get("standard_error") is not None:
            text += f" (standard error {sampling['standard_error']:.2f}, {sampling['completions']} sampled completions)"
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
    if "base_copied_ngram_share" in evaluation:
        rows.append(("word 5-grams copied from the prompt", _percent(evaluation["base_copied_ngram_share"]),
                     _percent(evaluation["tuned_copied_ngram_share"])))
    return rows


def _rule_cell(judged: dict | None) -> str:
    if judged is None:
        return ""
    return "passes" if judged["passed"] else "fails: " + ", ".join(c.replace("_", " ") for c in judged["failed"])


def _prompt_text(row: dict) -> str:
    return row["input_text"] if "input_text" in row else "\n".join(f"{m['role']}: {m['content']}" for m in row["messages"])


# The policy curves a person looks at: the sampling methods' reward, KL and length; DPO's loss and implicit reward.
POLICY_CHARTS = {False: (("reward", "reward"), ("kl_loss", "kl_loss"), ("response_length", "response length (tokens)")),
                 True: (("dpo_loss", "loss"), ("reward_margin", "implicit reward margin (winner - loser)"),
                        ("accuracy", "training accuracy of the implicit reward"))}


def render_html(parameters: dict, metrics: dict, comparison: list[dict], reward_scalars: dict,
                policy_scalars: dict) -> str:
    evaluation = metrics["evaluation"]
    policy = metrics.get("policy", {})
    method = policy.get("tuning_method", "ppo").upper()
    warm_up = (f", after {policy['sft_steps']} supervised steps on the winners" if policy.get("sft_steps")
               else f", after {policy['dpo_warmup_steps']} DPO steps on the pairs" if policy.get("dpo_warmup_steps")
               else "")
    side_by_side = [{"prompt": _prompt_text(entry), "base": entry["base"], "tuned": entry["tuned"],
                     "base_rule": _rule_cell(entry.get("base_rule")), "tuned_rule": _rule_cell(entry.get("tuned_rule")),
                     "base_reward": entry["base_reward"], "tuned_reward": entry["tuned_reward"],
                     "gain": entry["reward_gain"]} for entry in comparison]
    return _templates().get_template("report.html").render(
        method=method + warm_up, verdict=verdict(evaluation), rule_verdict=rule_verdict(evaluation),
        judges=judges_table(evaluation),
        with_rule="rule_pass_rate_tuned" in evaluation, side_by_side=side_by_side,
        reward_charts=[line_chart_geometry(reward_scalars.get(name, []), title)
                       for name, title in (("rank_loss", "Reward model: rank_loss"),
                                           ("accuracy", "Reward model: training accuracy"))],
        policy_charts=[line_chart_geometry(policy_scalars.get(name, []), f"{method}: {title}")
                       for name, title in POLICY_CHARTS[method == "DPO"]],
        distribution=histogram_geometry({"base": [c["base_reward"] for c in comparison],
                                         "tuned": [c["tuned_reward"] for c in comparison]}, "Reward: base vs tuned"),
        metrics=[(f"{stage}.{name}", json.dumps(value)) for stage in ("reward_model", "policy", "evaluation")
                 for name, value in metrics.get(stage, {}).items() if not isinstance(value, dict)],
        parameters=[(str(name), json.dumps(value)) for name, value in sorted(parameters.items())]) + "\n"


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
