"""The memory estimate behind `rlhf submit`'s choice of GPU (`rlhf.models.memory`) against the peak memory of
the same passes measured here, in float32 on the CPU: what one training pass keeps for its backward pass.

    .venv/bin/python bench/memory_estimate.py [--repetitions 3]

Each pass runs in its own child process, which loads the model, resets the kernel's peak-RSS counter
(`/proc/self/clear_refs`) and reports two peaks above what it held before the pass: its resident memory, and
the bytes of the tensors the pass makes while they live (`live_tensors`: what a GPU's allocator would hold,
where a CPU's resident memory also keeps pages the allocator freed and has not given back; buffers a kernel
makes for itself are not seen). The weights, loaded before, are not counted (the estimate's weights are the
parameter count times the bytes of a value, checked exactly in tests/test_memory.py). The passes, with random
token ids (memory depends on shapes, not on text):

- reward model: one forward and backward pass of the reward model (LoRA rank 4, scalar head) over a packed
  micro-batch of `--rm-rows` rows of `--rm-length` tokens, against `activation_bytes`;
- policy update: one PPO-shaped loss over `--rows` rollouts of prompt + completion tokens (LoRA rank 8, value
  head, entropy), against `activation_bytes` plus the completion positions' float32 logits;

each on the default model and on the tests' tiny model widened to be measurable (`--tiny-hidden`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, model_dir, our_versions, resident_kib, write_results

NAME = "memory_estimate"
PASSES = ("reward model", "policy update")
MODELS = ("default", "tiny")


def tiny_model(directory: Path, hidden: int) -> str:
    """The tests' tiny model, `hidden` wide with 4 layers, saved in `directory`."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_model import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    build_model(tokenizer, hidden_size=hidden, layers=4).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def live_tensors():
    """A context that counts the bytes of the tensors made within it while they live, and their peak: what a GPU's
    allocator would hold for the pass (less its rounding), where a CPU's resident memory also keeps freed pages
    the allocator has not given back."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.weak import WeakIdKeyDictionary

    class LiveTensors(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.counted = WeakIdKeyDictionary()  # storages made within the context

        def _freed(self, size: int) -> None:
            self.live -= size

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # A view or an in-place result shares an input's storage: new memory only where no input had it.
            given = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            output = func(*args, **(kwargs or {}))
            for tensor in tree_leaves(output):
                if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                    storage = tensor.untyped_storage()
                    if id(storage) not in given and storage not in self.counted:
                        self.counted[storage] = True
                        self.live += storage.nbytes()
                        weakref.finalize(storage, self._freed, storage.nbytes())
            self.peak = max(self.peak, self.live)
            return output

    import torch

    return LiveTensors()


def child(kind: str, path: str, args) -> dict:
    import torch

    from rlhf.models.loading import add_lora, load_backbone, load_causal_lm, load_tokenizer, pick_placement
    from rlhf.models.memory import ModelShape, activation_bytes, completion_logits_bytes
    from rlhf.reward.model import RewardModel
    from rlhf.reward.packing import pack
    from rlhf.reward.training import pairwise_loss
    from rlhf.rl.policy import Policy
    from rlhf.rl.rollouts import Rollout

    shape = ModelShape.from_config(json.loads((Path(path) / "config.json").read_text()))
    tokenizer = load_tokenizer(path)
    generator = torch.Generator().manual_seed(0)
    ids = lambda count: torch.randint(3, len(tokenizer), (count,), generator=generator).tolist()  # noqa: E731
    if kind == "reward model":
        model = RewardModel.with_new_head(add_lora(load_backbone(path, pick_placement("cpu")), 4), 0)
        third = args.rm_length // 3
        batch = pack([ids(args.rm_length - 2 * third) for _ in range(args.rm_rows)],
                     [[ids(third), ids(third)] for _ in range(args.rm_rows)], tokenizer.pad_token_id)
        tokens = args.rm_rows * args.rm_length
        estimate = activation_bytes(shape, tokens, 4, False)
        model.train()
        run = lambda: pairwise_loss(model(batch))[0].sum().backward()  # noqa: E731
    else:
        policy = Policy.create(load_causal_lm(path, pick_placement("cpu")), 8, [tokenizer.eos_token_id],
                               tokenizer.pad_token_id)
        length = args.prompt_tokens + args.completion_tokens
        sequences = torch.tensor([ids(length) for _ in range(args.rows)])
        rollout = Rollout(sequences=sequences, attention_mask=torch.ones_like(sequences),
                          completion_mask=torch.ones(args.rows, args.completion_tokens),
                          ended=torch.ones(args.rows, dtype=torch.bool))
        tokens = args.rows * length
        estimate = (activation_bytes(shape, tokens, 4, False)
                    + completion_logits_bytes(shape, args.rows, args.completion_tokens))
        policy.model.train()

        def run():
            log_probs, _, values = policy.evaluate(rollout, 1.0, with_entropy=True)
            (-log_probs.mean() + values.square().mean()).backward()
    tracker = live_tensors()
    Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS counter now starts from here
    held = resident_kib("VmRSS")
    with tracker:
        run()
    tensors = tracker.peak
    return {"pass": kind, "tokens": tokens, "measured_mib": (resident_kib("VmHWM") - held) / 1024,
            "tensor_peak_mib": tensors / 2**20, "estimate_mib": estimate / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=3, help="child processes per pass and model")
    parser.add_argument("--rm-rows", type=int, default=16)
    parser.add_argument("--rm-length", type=int, default=256)
    parser.add_argument("--rows", type=int, default=8, help="rollouts in the policy update")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--completion-tokens", type=int, default=64)
    parser.add_argument("--tiny-hidden", type=int, default=256, help="hidden width of the tiny model")
    parser.add_argument("--child", nargs=2, metavar=("PASS", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args)))
        return
    forwarded = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
                 if name not in ("child", "repetitions")]
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        paths = {"default": model_dir(), "tiny": tiny_model(Path(scratch), args.tiny_hidden)}
        for _ in range(args.repetitions):
            for model in MODELS:
                for kind in PASSES:
                    output = subprocess.run([sys.executable, __file__, *forwarded, "--child", kind, paths[model]],
                                            capture_output=True, text=True, check=True)
                    runs.setdefault(f"{model}, {kind}", []).append(json.loads(output.stdout.strip().splitlines()[-1]))
    rows, lines = {}, []
    for name, measured in runs.items():
        median = statistics.median(run["measured_mib"] for run in measured)
        tensors = statistics.median(run["tensor_peak_mib"] for run in measured)
        estimate = measured[0]["estimate_mib"]
        rows[name] = {"measured_median_mib": median, "estimate_mib": estimate, "estimate_over_measured": estimate / median,
                      "tokens": measured[0]["tokens"], "runs_mib": [run["measured_mib"] for run in measured],
                      "tensor_peak_median_mib": tensors, "estimate_over_tensor_peak": estimate / tensors,
                      "tensor_peak_runs_mib": [run["tensor_peak_mib"] for run in measured]}
        lines.append(f"| {name} | {measured[0]['tokens']} | {median:.0f} ({', '.join(f'{r:.0f}' for r in rows[name]['runs_mib'])}) "
                     f"| {tensors:.0f} | {estimate:.0f} | {estimate / median:.2f} | {estimate / tensors:.2f} |")
    markdown = ("| model, pass | tokens | peak resident memory above the start, MiB (median; runs) | live tensors at "
                "their peak, MiB (median) | estimate, MiB | estimate / resident | estimate / live tensors |\n"
                "|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")
    write_results(NAME, {"settings": {k: v for k, v in vars(args).items() if k != "child"}, "machine": machine(),
                         "versions": our_versions(), "passes": rows}, markdown)


if __name__ == "__main__":
    main()
