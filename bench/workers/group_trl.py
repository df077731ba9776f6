"""TRL's side of the RLOO and GRPO benchmarks: `trl.RLOOTrainer` or `trl.GRPOTrainer` (TRL 1.16) on the same
prompts, with the same LoRA on the policy and a reward model of the same weights as ours, timing every
optimizer step.

TRL's design, used as documented: `num_generations` completions per prompt, the reference is the policy with
its adapter disabled (as ours), the reward model is a separate sequence-classification model scoring the
decoded prompt and completion (ours scores the same token ids without decoding).

Runs in bench/.venv-trl-1.16.0: python group_trl.py SPEC.json RESULT.json
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
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from trl_worker import scorer, start

TRAINERS = {"rloo": (RLOOConfig, RLOOTrainer), "grpo": (GRPOConfig, GRPOTrainer)}


def main() -> None:
    spec, settings, output = start()
    config_class, trainer_class = TRAINERS[settings["tuning_method"]]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    reward = scorer(spec["model_dir"], spec["reward_head"])
    lora = LoraConfig(r=settings["lora_rank"], lora_alpha=2 * settings["lora_rank"], lora_dropout=0.0,
                      target_modules=settings["lora_targets"], bias="none", task_type="CAUSAL_LM")
    # The templated prompt as text: TRL tokenises it again without special tokens, giving the same ids.
    prompts = Dataset.from_list([{"prompt": tokenizer.decode(r["prompt_ids"])} for r in spec["rows"]])
    k = settings["samples_per_prompt"]
    completions = settings["batch_size"] * k
    args = config_class(
        output_dir=str(output), max_steps=settings["steps"], per_device_train_batch_size=completions,
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=k, num_iterations=settings["ppo_epochs"],
        max_completion_length=settings["new_tokens"], temperature=settings["temperature"], top_p=1.0,
        beta=settings["kl_coeff"], learning_rate=settings["learning_rate"], lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False, shuffle_dataset=False,
        use_cpu=True, bf16=False,
        seed=settings["seed"], logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False)
    clock = StepClock()
    trainer = trainer_class(model=policy, reward_funcs=reward, args=args, train_dataset=prompts,
                            processing_class=tokenizer, reward_processing_classes=tokenizer, peft_config=lora,
                            callbacks=[clock])
    trainer.train()
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history
               if "completions/mean_length" in entry]
    result = {"step_seconds": [b - a for a, b in zip(clock.step_ends, clock.step_ends[1:])],
              "step_cpu_seconds": [b - a for a, b in zip(clock.step_cpu_ends, clock.step_cpu_ends[1:])],
              "response_length": lengths,
              "self_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
