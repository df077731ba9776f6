"""Does a reward model pay for copying? For each post of the bundled sample's preference pairs, the reward
model scores one of the post's winners (a summary in its own words) against the post's own opening
sentences, copied (as many whole sentences as stay under the word limit), and the rule judge judges both.

    python experiments/copy_vs_summary.py --reward-model RUN/pipeline_root/rlhf-pipeline/train-reward-model/reward_model

The reward model trained on pairs of these posts (winners included), so the comparison leans towards the
winners; since the sample has copied losers (December 5) it also trained on copied openings of these posts
as losers. Prints the share of posts where the copy scores higher, both mean scores, and the rule's pass
rate of each.
"""

import argparse
import json
import re
from pathlib import Path

SENTENCE = re.compile(r"[^.!?]+[.!?]+[\"')\]]*\s*")


def copied_opening(post: str, word_limit: int) -> str | None:
    """The post's first whole sentences, as many as stay under `word_limit` words; None when even the first
    sentence does not."""
    kept = []
    for sentence in SENTENCE.findall(post.split(" [summary]:")[0]):
        if len(" ".join(kept + [sentence.strip()]).split()) >= word_limit:
            break
        kept.append(sentence.strip())
    return " ".join(kept) or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward-model", type=Path, required=True, help="a trained reward model directory")
    args = parser.parse_args()

    from rlhf.data.datasets import read_jsonl, sample_dataset
    from rlhf.evaluation.compare import completion_ids
    from rlhf.evaluation.rule_judge import rule_for_instruction
    from rlhf.models.loading import pick_placement
    from rlhf.models.reference import DEFAULT_MODEL, resolve_model_reference
    from rlhf.reward.model import load_reward_model, score_packed

    reward = load_reward_model(args.reward_model, pick_placement("cpu"), resolve_model_reference(DEFAULT_MODEL))
    rule = rule_for_instruction(reward.spec.instruction)
    encoder, tokenizer, limit = reward.encoder(), reward.tokenizer, reward.spec.target_sequence_length
    first_winner = {}
    for row in read_jsonl(Path(sample_dataset("preference.jsonl"))):
        first_winner.setdefault(row["input_text"], row[f"candidate_{row['choice']}"])
    rows, pairs = [], []
    for post, winner in first_winner.items():
        copy = copied_opening(post, rule.word_limit)
        if copy is None:
            continue
        rows.append({"input_text": post, "winner": winner, "copy": copy})
        pairs.append([completion_ids(tokenizer, text, True, limit) for text in (winner, copy)])
    scores = reward.normalise(score_packed(reward.model, [encoder.encode_prompt(r) for r in rows], pairs,
                                           tokenizer.pad_token_id, 4096))
    passes = {side: sum(rule.judge(r["input_text"], r[side]).passed for r in rows) / len(rows)
              for side in ("winner", "copy")}
    result = {"posts": len(rows), "copy_scores_higher": float((scores[:, 1] > scores[:, 0]).float().mean()),
              "mean_score_winner": float(scores[:, 0].mean()), "mean_score_copy": float(scores[:, 1].mean()),
              "rule_pass_winner": passes["winner"], "rule_pass_copy": passes["copy"]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
