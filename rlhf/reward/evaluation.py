"""How good is a reward model on labelled pairs, and did it learn more than "longer is better"?"""

from __future__ import annotations

from pathlib import Path

from rlhf.data.validation import chosen, longer_wins, rejected
from rlhf.models.loading import pick_placement
from rlhf.reward.model import load_reward_model, score_packed


def evaluate_reward_model(directory: Path, rows: list[dict], device: str = "auto", max_tokens: int = 4096,
                          base_model_path: str | None = None) -> dict:
    loaded = load_reward_model(directory, pick_placement(device), base_model_path)
    encoder = loaded.encoder()
    prompts = [encoder.encode_prompt(r) for r in rows]
    completions = [[encoder.encode_completion(chosen(r)), encoder.encode_completion(rejected(r))] for r in rows]
    scores = score_packed(loaded.model, prompts, completions, loaded.tokenizer.pad_token_id, max_tokens)
    margins = (scores[:, 0] - scores[:, 1]).tolist()
    correct = [float(m > 0) for m in margins]
    longer = [longer_wins(r) for r in rows]
    prefers_longer = [float((m > 0) == (lw == 1.0)) for m, lw in zip(margins, longer) if lw != 0.5]
    shorter_won = [c for c, lw in zip(correct, longer) if lw == 0.0]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {
        "pairs": len(rows),
        "accuracy": mean(correct),
        "mean_margin": mean(margins),
        "length_baseline_accuracy": mean(longer),
        "model_prefers_longer": mean(prefers_longer),
        "accuracy_where_shorter_won": mean(shorter_won),
        "pairs_where_shorter_won": len(shorter_won),
    }
