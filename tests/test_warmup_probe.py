"""The warm-up probe (experiments/warmup_probe.py) judges a warmed-up policy by a finished run's reward model only
when that run had the probe's settings and data: any other run's warm-up would not be the one judged."""

import hashlib
import json

import pytest

from rlhf.pipeline.local_run import DATASET_PARAMETERS
from tests.conftest import load_experiment

SCRIPT = load_experiment("warmup_probe")


def finished_run(directory, parameters):
    """The record `rlhf run` leaves: its settings and the sha256 of each dataset file."""
    inputs = {name: hashlib.sha256(open(parameters[name], "rb").read()).hexdigest() for name in DATASET_PARAMETERS}
    (directory / "run.json").write_text(json.dumps({"parameters": parameters, "inputs": inputs}))
    return directory


def test_a_run_with_the_seeds_settings_and_data_is_that_seeds_warm_up(tmp_path):
    parameters, _, _ = SCRIPT.settings_for(1, [])
    assert SCRIPT.differences_from_run(finished_run(tmp_path, parameters), parameters) == []


def test_a_setting_left_at_the_pipelines_default_is_that_default(tmp_path):
    parameters, _, _ = SCRIPT.settings_for(0, [])
    recorded = {name: value for name, value in parameters.items() if name != "seed"}  # seed 0 is the default
    assert SCRIPT.differences_from_run(finished_run(tmp_path, recorded), parameters) == []


def test_another_seed_or_other_data_is_refused_by_name(tmp_path):
    parameters, _, _ = SCRIPT.settings_for(2, [])
    run = finished_run(tmp_path, {**parameters, "seed": 1})
    assert SCRIPT.differences_from_run(run, parameters) == ["seed"]

    edited = tmp_path / "preference.jsonl"
    edited.write_text(open(parameters["preference_dataset"]).read() + "\n")
    run = finished_run(tmp_path, {**parameters, "preference_dataset": str(edited)})
    assert SCRIPT.differences_from_run(run, parameters) == ["preference_dataset"]


def test_runs_must_name_one_finished_run_per_seed(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["warmup_probe.py", "--output-dir", str(tmp_path / "out"), "--seeds", "0", "1",
                                     "--runs", str(tmp_path)])
    with pytest.raises(SystemExit, match="names 1 runs for 2 seeds"):
        SCRIPT.main()
    assert not (tmp_path / "out").exists()
