"""TRL's side of the DPO benchmark: `trl.DPOTrainer` (LoRA, the reference is the adapter switched off) on the
same pairs, timing every optimizer step, then the implicit reward's held-out accuracy as TRL measures it.

Runs in bench/.venv-trl-1.16.0: python dpo_trl.py SPEC.json RESULT.json
"""

import sys

import torch
from datasets import Dataset
from pair_result import write_pair_result
from peft import LoraConfig
from step_clock import StepClock
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from trl_worker import start


def text_pairs(rows: list[dict], tokenizer) -> Dataset:
    """The same token ids as text: the templated prompt, and each completion without its EOS (TRL appends it)."""
    def completion(row: dict, key: str) -> str:
        ids = row[key][len(row["prompt_ids"]):]
        return tokenizer.decode(ids[:-1] if ids[-1] == tokenizer.eos_token_id else ids)

    return Dataset.from_list([{"prompt": tokenizer.decode(r["prompt_ids"]), "chosen": completion(r, "chosen_ids"),
                               "rejected": completion(r, "rejected_ids")} for r in rows])


def main() -> None:
    spec, settings, output = start()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    lora = LoraConfig(r=settings["lora_rank"], lora_alpha=2 * settings["lora_rank"], lora_dropout=0.0,
                      target_modules=settings["lora_targets"], bias="none", task_type="CAUSAL_LM")
    per_forward = settings["pairs_per_forward"]
    args = DPOConfig(
        output_dir=str(output), max_steps=settings["steps"], per_device_train_batch_size=per_forward,
        per_device_eval_batch_size=per_forward, gradient_accumulation_steps=settings["batch_size"] // per_forward,
        learning_rate=settings["learning_rate"], lr_scheduler_type="cosine", warmup_steps=settings["warmup_fraction"],
        weight_decay=0.0, max_grad_norm=1.0, max_length=settings["max_length"], beta=settings["beta"],
        gradient_checkpointing=False, use_cpu=True, bf16=False, seed=settings["seed"], logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    clock = StepClock()
    trainer = DPOTrainer(model=model, args=args, train_dataset=text_pairs(spec["train_rows"], tokenizer),
                         eval_dataset=text_pairs(spec["held_out_rows"], tokenizer), processing_class=tokenizer,
                         peft_config=lora, callbacks=[clock])
    trainer.train()
    accuracy = trainer.evaluate()["eval_rewards/accuracies"]
    write_pair_result(sys.argv[2], clock.step_ends, clock.step_cpu_ends, accuracy, len(spec["held_out_rows"]))


if __name__ == "__main__":
    main()
