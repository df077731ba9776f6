"""`rlhf serve`: the tuned policy answers Vertex AI prediction requests, as the serving container runs it."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from rlhf.evaluation.config import InferenceConfig
from rlhf.evaluation.inference import bulk_infer
from rlhf.rl.policy import ADAPTER_DIR, MERGED_DIR, read_policy_spec
from rlhf.rl.ppo import train_policy
from tests.conftest import PROMPTS, TargetTokenShare, free_port
from tests.conftest import ppo_config as config

pytestmark = pytest.mark.slow

ROWS = [{"input_text": "post number 3 about a dog"}, {"messages": [{"role": "user", "content": "a cat post"}]}]


@pytest.fixture(scope="module")
def policy_dir(tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("served-policy")
    train_policy(config(train_steps=2, target_sequence_length=6, export_merged=True), PROMPTS[:8], TargetTokenShare(),
                 str(tiny_model_dir), output)
    return output


@pytest.fixture(scope="module")
def client(policy_dir):
    from rlhf.serving import create_app, load_predictor

    return create_app(load_predictor(str(policy_dir))).test_client()


def test_predictions_equal_bulk_inference_of_the_tuned_policy(client, policy_dir, tiny_model_dir):
    spec = read_policy_spec(policy_dir)
    expected = bulk_infer(ROWS, str(tiny_model_dir), InferenceConfig(
        target_sequence_length=spec.target_sequence_length, prompt_sequence_length=spec.prompt_sequence_length,
        instruction=spec.instruction, use_chat_template=spec.use_chat_template), policy_dir / ADAPTER_DIR)
    assert client.get("/health").json == {"status": "ok"}
    answer = client.post("/predict", json={"instances": ROWS})
    assert answer.status_code == 200
    assert [p["prediction"] for p in answer.json["predictions"]] == [e["prediction"] for e in expected]
    bare = client.post("/predict", json={"instances": ["post number 3 about a dog"]}).json["predictions"]
    assert bare[0]["prediction"] == expected[0]["prediction"]


def test_sampling_parameters_apply_per_request(client):
    def predictions(**parameters):
        answer = client.post("/predict", json={"instances": ROWS, "parameters": parameters})
        assert answer.status_code == 200
        return [p["prediction"] for p in answer.json["predictions"]]

    short = client.post("/predict", json={"instances": ROWS, "parameters": {"max_new_tokens": 2}})
    assert short.status_code == 200 and all(p["tokens"] <= 2 for p in short.json["predictions"])
    greedy = predictions()
    assert predictions(temperature=0) == greedy
    # Sampling at temperature 1 does leave the greedy path here, so the two checks after it can fail:
    assert any(predictions(temperature=1.0) != greedy for _ in range(4))
    assert predictions(temperature=1e-4) == greedy  # near-zero temperature: the likeliest token each time
    assert predictions(temperature=1.0, top_p=1e-6) == greedy  # a nucleus of one token


@pytest.mark.parametrize("body,message", [
    ({}, "expected a JSON object"),
    ({"instances": []}, "at least one instance"),
    ({"instances": [{"text": "x"}]}, "instances[0]: expected a non-empty string"),
    ({"instances": ["x"], "parameters": {"max_new_tokens": 10_000}}, "max_new_tokens: a whole number from 1 to 6"),
    ({"instances": ["x"], "parameters": {"beam_width": 4}}, "unknown beam_width"),
    ({"instances": ["x"] * 65}, "at most 64 per request"),
])
def test_bad_requests_get_a_400_that_says_why(client, body, message):
    answer = client.post("/predict", json=body)
    assert answer.status_code == 400
    assert message in answer.json["error"]


def test_the_command_serves_on_the_vertex_port_and_routes(policy_dir, tmp_path):
    import shutil

    adapter_only = tmp_path / "policy"
    shutil.copytree(policy_dir, adapter_only, ignore=shutil.ignore_patterns(MERGED_DIR))
    port = free_port()
    env = {**os.environ, "AIP_HTTP_PORT": str(port), "AIP_HEALTH_ROUTE": "/v1/health",
           "AIP_PREDICT_ROUTE": "/v1/models/tuned:predict", "AIP_STORAGE_URI": str(adapter_only)}
    server = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "serve", "--host", "127.0.0.1"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=2) as response:
                    assert json.load(response) == {"status": "ok"}
                    break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
                time.sleep(0.5)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/tuned:predict",
                                         data=json.dumps({"instances": ROWS}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.load(response)["predictions"]
        assert len(predictions) == 2 and all(isinstance(p["prediction"], str) for p in predictions)
    finally:
        server.terminate()
        server.wait(timeout=30)
