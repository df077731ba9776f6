"""What a separate critic would cost next to the value head on the policy, on the default model.

Times, for one micro-batch of rollouts (prompt + completion tokens), the rollout-time forward pass and
the update-time forward + backward pass: (a) policy with its value head (what rlhf.rl.ppo does), and
(b) the same plus a separate critic backbone (a second copy of the base model with its own LoRA and
value head, the usual alternative). Prints medians of several repetitions and the ratio b / a.

    python experiments/value_head_cost.py [--batch 8] [--prompt-tokens 160] [--completion-tokens 48]
"""

import argparse
import json
import statistics
import time
from functools import partial

import torch

from rlhf.models.loading import add_lora, load_backbone, load_causal_lm, load_tokenizer, pick_placement
from rlhf.models.reference import DEFAULT_MODEL, resolve_model_reference
from rlhf.rl.policy import Policy
from rlhf.rl.rollouts import make_rollout


def median_seconds(work, repetitions: int) -> float:
    work()
    times = []
    for _ in range(repetitions):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=160)
    parser.add_argument("--completion-tokens", type=int, default=48)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()

    path = resolve_model_reference(DEFAULT_MODEL)
    placement = pick_placement("auto")
    tokenizer = load_tokenizer(path)
    policy = Policy.create(load_causal_lm(path, placement), 8, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    critic = add_lora(load_backbone(path, placement), 8)
    critic_head = torch.nn.Linear(critic.config.hidden_size, 1).to(placement.device)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (args.prompt_tokens,), generator=generator).tolist() for _ in range(args.batch)]
    completions = [torch.randint(100, 40000, (args.completion_tokens,), generator=generator).tolist()
                   for _ in range(args.batch)]
    rollout = make_rollout(prompts, completions, tokenizer.pad_token_id, [True] * args.batch).to(placement.device)

    def critic_values():
        hidden = critic(input_ids=rollout.sequences, attention_mask=rollout.attention_mask).last_hidden_state
        return critic_head(hidden[:, -args.completion_tokens - 1:-1].float()).squeeze(-1)

    def rollout_pass(separate: bool):
        with torch.no_grad():
            policy.evaluate(rollout, 1.0)
            if separate:
                critic_values()

    def update_pass(separate: bool):
        log_probs, _, values = policy.evaluate(rollout, 1.0)
        loss = log_probs.mean() + values.mean()
        if separate:
            loss = loss + critic_values().mean()
        loss.backward()
        policy.zero_grad(set_to_none=True)
        critic.zero_grad(set_to_none=True)

    result = {"device": str(placement.device), "batch": args.batch, "prompt_tokens": args.prompt_tokens,
              "completion_tokens": args.completion_tokens}
    for name, work in (("rollout_forward", rollout_pass), ("update_forward_backward", update_pass)):
        shared = median_seconds(partial(work, False), args.repetitions)
        separate = median_seconds(partial(work, True), args.repetitions)
        result[name] = {"value_head_seconds": round(shared, 3), "separate_critic_seconds": round(separate, 3),
                        "ratio": round(separate / shared, 3)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
