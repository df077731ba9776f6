"""TRL's side of the PPO benchmark: `trl.experimental.ppo.PPOTrainer` (TRL 1.12) on the same prompts, with the
same LoRA on the policy and a reward model of the same weights as ours, timing every PPO update.

TRL's design, used as documented: the reference is the policy with its adapter disabled (as ours), the value
function is a separate full model (ours: a head on the policy), and the reward model is a separate model.

Runs in bench/.venv-trl: python ppo_trl.py SPEC.json RESULT.json
"""

import json
import resource
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from step_clock import StepClock
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl_worker import scorer, start


def main() -> None:
    spec, settings, output = start()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")
    # PPOTrainer finds the end of each response by the pad token: it must differ from EOS.
    tokenizer.pad_token = settings["trl_pad_token"]
    policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    value, reward = scorer(spec["model_dir"], None), scorer(spec["model_dir"], spec["reward_head"])
    for model in (value, reward):
        model.config.pad_token_id = tokenizer.pad_token_id
    lora = LoraConfig(r=settings["lora_rank"], lora_alpha=2 * settings["lora_rank"], lora_dropout=0.0,
                      target_modules=settings["lora_targets"], bias="none", task_type="CAUSAL_LM")
    prompts = Dataset.from_list([{"input_ids": r["prompt_ids"]} for r in spec["rows"]])
    batch = settings["batch_size"]
    args = PPOConfig(
        output_dir=str(output), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_mini_batches=1, local_rollout_forward_batch_size=batch, total_episodes=settings["steps"] * batch,
        num_ppo_epochs=settings["ppo_epochs"], response_length=settings["new_tokens"], stop_token="eos",
        temperature=settings["temperature"], kl_coef=settings["kl_coeff"], learning_rate=settings["learning_rate"],
        lr_scheduler_type="cosine", num_sample_generations=0, use_cpu=True, bf16=False, seed=settings["seed"],
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    clock = StepClock()
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
                         value_model=value, train_dataset=prompts, eval_dataset=prompts.select(range(batch)),
                         peft_config=lora, callbacks=[clock])
    trainer.train()
    result = {"step_seconds": [b - a for a, b in zip(clock.step_ends, clock.step_ends[1:])],
              "step_cpu_seconds": [b - a for a, b in zip(clock.step_cpu_ends, clock.step_cpu_ends[1:])],
              "self_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
