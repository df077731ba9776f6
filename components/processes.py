"""The stages as the components run them: in the component's own process on one accelerator, or as one
process per accelerator (`rlhf.training.distributed.launch`) each running this module, when the pipeline
gives the stage several (`*_accelerator_count`) or several machines (`*_replica_count`, `CLUSTER_SPEC`).

`python -m rlhf.components.processes STAGE ARGUMENTS.json RESULT.json` is one such process: STAGE is one of
`STAGES`, ARGUMENTS.json holds its keyword arguments, and rank 0 writes what it returns to RESULT.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def train_reward_model(settings: dict, plain_text: bool, train_pairs: str, held_out_pairs: str,
                       large_model_reference: str, output: str) -> dict:
    from rlhf.data.datasets import read_jsonl
    from rlhf.reward.config import RewardTrainingConfig
    from rlhf.reward.training import train_reward_model as train
    from rlhf.training.stopping import StopFlag

    config = RewardTrainingConfig.from_values(settings, plain_text)
    return train(config, read_jsonl(Path(train_pairs)), read_jsonl(Path(held_out_pairs)), large_model_reference,
                 Path(output), stop_requested=StopFlag().install())


def train_policy(settings: dict, plain_text: bool, prompts: str, reward_model: str, train_pairs: str,
                 held_out_pairs: str, large_model_reference: str, output: str) -> dict:
    from rlhf.data.datasets import read_jsonl
    from rlhf.rl.config import PPOConfig
    from rlhf.training.stopping import StopFlag

    config = PPOConfig.from_values(settings, plain_text)
    config.validate()
    if config.tuning_method == "dpo":
        from rlhf.rl.dpo import train_dpo

        return train_dpo(config, read_jsonl(Path(train_pairs)), read_jsonl(Path(held_out_pairs)),
                         large_model_reference, Path(output), stop_requested=StopFlag().install())
    from rlhf.rl.ppo import train_policy as train
    from rlhf.rl.rewards import RewardModelReward

    reward = RewardModelReward.for_stage(Path(reward_model), config)
    warmup_pairs = read_jsonl(Path(train_pairs)) if config.warmup_steps() else []
    return train(config, read_jsonl(Path(prompts)), reward, large_model_reference, Path(output),
                 stop_requested=StopFlag().install(), train_pairs=warmup_pairs)


def bulk_inference(settings: dict, prompts: str, model: str, adapter: str | None, output: str) -> dict:
    from rlhf.data.datasets import read_jsonl, write_jsonl
    from rlhf.evaluation.config import InferenceConfig
    from rlhf.evaluation.inference import bulk_infer
    from rlhf.training.distributed import join

    rows = bulk_infer(read_jsonl(Path(prompts)), model, InferenceConfig(**settings), Path(adapter) if adapter else None)
    if join().main:
        write_jsonl(Path(output), rows)
    return {"rows": len(rows)}


def evaluate(base_predictions: str, tuned_predictions: str, reward_model: str, policy: str, output: str,
             parameters: dict, seed: int, shard_weights: bool) -> dict:
    from rlhf.data.datasets import read_jsonl
    from rlhf.evaluation.compare import evaluate_run

    return evaluate_run(read_jsonl(Path(base_predictions)), read_jsonl(Path(tuned_predictions)), Path(reward_model),
                        Path(policy), Path(output), parameters, seed=seed, shard_weights=shard_weights)


STAGES = {"reward_model": train_reward_model, "policy": train_policy, "bulk_inference": bulk_inference,
          "evaluate": evaluate}


def run_stage(stage: str, processes: int, **arguments) -> dict:
    """What the stage returns (a trainer: its metrics, or `{"interrupted": True, "step": N}` when it stopped at
    a checkpoint), run here for one process on one machine, else in `processes` processes on each machine of
    `CLUSTER_SPEC`. On a replica of a custom job other than the chief, the stage's task ends here."""
    from rlhf.errors import RunFailure
    from rlhf.training.distributed import Machines, launch

    machines = Machines.from_environment()
    if processes == 1 and machines.count == 1:
        return STAGES[stage](**arguments)
    with tempfile.TemporaryDirectory() as scratch:
        given, result = Path(scratch) / "arguments.json", Path(scratch) / "result.json"
        given.write_text(json.dumps(arguments))
        status = launch(processes, [stage, str(given), str(result)], module="rlhf.components.processes")
        if status not in (0, 75):
            raise RunFailure(f"the {stage.replace('_', ' ')} stage's {processes * machines.count} processes failed "
                             f"(status {status}); a training stage's checkpoint is kept, and running it again "
                             "resumes from it")
        if machines.rank:
            # The chief's first process (rank 0) wrote the stage's outputs, and KFP lets only the chief write the
            # task's: this machine's part is done.
            raise SystemExit(status)
        return json.loads(result.read_text())


def main(stage: str, arguments: Path, result: Path) -> int:
    from rlhf.training.distributed import join, leave

    returned = STAGES[stage](**json.loads(arguments.read_text()))
    if join().main:
        result.write_text(json.dumps(returned))
    leave()
    return 75 if returned.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])))
