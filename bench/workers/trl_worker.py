"""What every TRL-side worker shares: its spec, a clean output directory, the seed, and the reward (and PPO
value) model as TRL loads one: the base weights as a sequence classifier, with our head."""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification


def start() -> tuple[dict, dict, Path]:
    """The spec of `python WORKER SPEC.json RESULT.json`, its settings and an emptied output directory; seeds torch."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    settings = spec["settings"]
    output = Path(spec["output_dir"])
    shutil.rmtree(output, ignore_errors=True)
    torch.manual_seed(settings["seed"])
    return spec, settings, output


def scorer(model_dir: str, head_file: str | None):
    """A sequence-classification model on the base weights; with `head_file`, the score head is ours."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    if head_file:
        with torch.no_grad():
            model.score.weight.copy_(load_file(head_file)["weight"])
    return model
