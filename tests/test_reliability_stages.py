"""A stage that fails is named, with the reason it gave and the path of its whole log; the terminal never
shows only a traceback. (The first stage's failures are in test_reliability_inputs.py.)"""

import subprocess
import sys

import pytest

from rlhf.data.datasets import sample_dataset

pytestmark = pytest.mark.slow

SMALL_RUN = ["reward_model_train_epochs=1", "reward_model_batch_size=8", "reinforcement_learning_train_steps=2",
             "reinforcement_learning_batch_size=4", "reinforcement_learning_micro_batch_size=4",
             "reinforcement_learning_minibatch_size=4",
             "target_sequence_length=12", "prompt_sequence_length=256"]


def test_a_stage_failing_on_a_bad_model_is_named_with_its_reason_and_log(unloadable_model_dir, tmp_path):
    output = tmp_path / "run"
    sets = [arg for pair in [*SMALL_RUN, f"large_model_reference={unloadable_model_dir}",
                             f"preference_dataset={sample_dataset('preference.jsonl')}"] for arg in ("--set", pair)]
    result = subprocess.run([sys.executable, "-m", "rlhf.cli", "run", "--output-dir", str(output), *sets],
                            capture_output=True, text=True)
    log = output / "logs" / "train-reward-model.log"
    assert result.returncode == 1, result.stderr[-3000:]
    assert "validate-datasets: success" in result.stderr
    assert f"rlhf run: failed: stage 'train-reward-model' failed; its log: {log}\n" in result.stderr
    reason = result.stderr.split("its log:", 1)[1].splitlines()[1:]
    assert len(reason) == 1 and "SafetensorError: Error while deserializing header" in reason[0], reason
    assert "Traceback" not in result.stderr
    # The log keeps everything the stage printed, the stack trace included, for whoever digs further.
    text = log.read_text()
    assert "Traceback (most recent call last):" in text and reason[0].strip() in text
