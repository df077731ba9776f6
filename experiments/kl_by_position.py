"""Where a tuned policy's KL to the base lies: in the first tokens of a completion (the switch from advice to
a summary, which the base model rarely starts) or spread over all of them (the wording).

    python experiments/kl_by_position.py --policy RUN/pipeline_root/rlhf-pipeline/train-policy/policy
        --eval-prompts RUN/pipeline_root/rlhf-pipeline/validate-datasets/eval_prompts [--samples 4]

Samples `--samples` completions per eval prompt from the tuned policy at its training temperature (and
nucleus), and sums the per-token log-ratio of the tuned and base (adapter off) distributions at each position,
as the evaluation's `kl_to_base` does (`sampled_log_ratios`; here the prompts are drawn in turn, there each
prompt's samples come together). Prints the mean KL per completion and its standard deviation, the nats at
each of the first twelve positions, and the split between the first three positions and the rest.
"""

import argparse
from pathlib import Path

import torch

from rlhf.data.datasets import read_jsonl
from rlhf.data.prompts import PromptEncoder
from rlhf.evaluation.compare import sampled_log_ratios
from rlhf.evaluation.inference import load_generator
from rlhf.models.loading import load_tokenizer, pick_placement, stop_token_ids
from rlhf.models.reference import resolve_model_reference
from rlhf.rl.policy import Policy, read_policy_spec

OPENING = 3  # positions counted as the completion's opening


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, required=True, help="a policy artifact (rlhf train-policy's output)")
    parser.add_argument("--eval-prompts", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    spec = read_policy_spec(args.policy)
    model_path = resolve_model_reference(spec.large_model_reference)
    model = load_generator(model_path, args.policy / "adapter", pick_placement("cpu"))
    tokenizer = load_tokenizer(model_path)
    encoder = PromptEncoder(tokenizer, spec.prompt_format(), spec.prompt_sequence_length, spec.target_sequence_length)
    prompts = [encoder.encode_prompt(row) for row in read_jsonl(args.eval_prompts)] * args.samples
    policy = Policy(model, None, stop_token_ids(model, tokenizer), tokenizer.pad_token_id)

    torch.manual_seed(args.seed)
    by_position = torch.zeros(spec.target_sequence_length, dtype=torch.float64)
    tokens, per_completion = 0.0, []
    for ratios, rollout in sampled_log_ratios(policy, prompts, spec):
        by_position[:ratios.shape[1]] += ratios.sum(dim=0).double()
        per_completion += ratios.sum(dim=1).tolist()
        tokens += rollout.completion_mask.sum().item()

    count = len(per_completion)
    nats = by_position / count
    print(f"{count} completions at temperature {spec.temperature}: KL to base {sum(per_completion) / count:.2f} "
          f"nats per completion (sd {torch.tensor(per_completion).std():.2f}), {tokens / count:.1f} tokens")
    print("nats at positions 1-12:", " ".join(f"{value:.2f}" for value in nats[:12]))
    print(f"first {OPENING} positions {nats[:OPENING].sum():.2f} nats; the rest {nats[OPENING:].sum():.2f}")


if __name__ == "__main__":
    main()
