"""TRL's side of the reward-model benchmark: `trl.RewardTrainer` on the same pre-tokenised pairs, timing
every optimizer step, then held-out accuracy.

Runs in bench/.venv-trl: python rm_trl.py SPEC.json RESULT.json
"""

import sys

import torch
from datasets import Dataset
from pair_result import write_pair_result
from peft import LoraConfig
from step_clock import StepClock
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference
from trl_worker import start


def pairs_dataset(rows: list[dict]) -> Dataset:
    return Dataset.from_list([{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]} for r in rows])


@torch.no_grad()
def held_out_accuracy(model, rows: list[dict], pad_id: int, batch_pairs: int) -> float:
    model.eval()
    collate = DataCollatorForPreference(pad_token_id=pad_id)
    correct = 0
    for first in range(0, len(rows), batch_pairs):
        batch = collate([{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]}
                         for r in rows[first:first + batch_pairs]])
        chosen, rejected = model(**batch).logits.squeeze(-1).chunk(2)
        correct += int((chosen > rejected).sum())
    return correct / len(rows)


def main() -> None:
    spec, settings, output = start()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    # A pad token distinct from EOS, so the score is read at the EOS that ends each completion, as ours does.
    tokenizer.pad_token = settings["trl_pad_token"]
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["model_dir"], num_labels=1, dtype=torch.float32, attn_implementation="sdpa")
    lora = LoraConfig(r=settings["lora_rank"], lora_alpha=2 * settings["lora_rank"], lora_dropout=0.0,
                      target_modules=settings["lora_targets"], bias="none", task_type="SEQ_CLS")
    args = RewardConfig(
        output_dir=str(output), max_steps=settings["steps"],
        per_device_train_batch_size=settings["trl_pairs_per_forward"],
        gradient_accumulation_steps=settings["batch_size"] // settings["trl_pairs_per_forward"],
        learning_rate=settings["learning_rate"], lr_scheduler_type="cosine", warmup_steps=settings["warmup_fraction"],
        weight_decay=0.0, max_grad_norm=1.0, max_length=settings["max_length"], gradient_checkpointing=False,
        use_cpu=True, bf16=False, seed=settings["seed"], logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0)
    clock = StepClock()
    trainer = RewardTrainer(model=model, args=args, train_dataset=pairs_dataset(spec["train_rows"]),
                            processing_class=tokenizer, peft_config=lora, callbacks=[clock])
    trainer.train()
    accuracy = held_out_accuracy(trainer.model, spec["held_out_rows"], tokenizer.pad_token_id,
                                 settings["trl_pairs_per_forward"])
    write_pair_result(sys.argv[2], clock.step_ends, clock.step_cpu_ends, accuracy, len(spec["held_out_rows"]))


if __name__ == "__main__":
    main()
