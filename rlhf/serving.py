"""Serve a tuned policy over HTTP the way Vertex AI's custom serving containers are called.

Vertex AI copies the uploaded artifact to `AIP_STORAGE_URI`, checks `GET AIP_HEALTH_ROUTE`, and sends
`POST AIP_PREDICT_ROUTE` with `{"instances": [...], "parameters": {...}}`; the reply is
`{"predictions": [...]}`, one per instance, in order. An instance is a prompt row as in the datasets
(`{"input_text": ...}` or `{"messages": [...]}`), or a bare string; the policy's instruction and prompt
format are applied as in training. The merged export is served when the artifact has one, else the base
model with the adapter.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from rlhf.data.storage import download_directory, is_gcs
from rlhf.data.validation import RowError, check_prompt
from rlhf.evaluation.config import InferenceConfig
from rlhf.evaluation.inference import Generator
from rlhf.models.reference import resolve_model_reference
from rlhf.rl.policy import ADAPTER_DIR, MERGED_DIR, read_policy_spec

MAX_INSTANCES = 64  # per request: more would hold the one model for too long
SAMPLING_PARAMETERS = {"max_new_tokens": int, "temperature": float, "top_p": float}


class BadRequest(ValueError):
    """A prediction request this server cannot answer; the message says why."""


def load_predictor(policy_uri: str, device: str = "auto", batch_size: int = 8) -> Generator:
    """The policy at `policy_uri` (a directory or gs:// prefix) ready to complete prompt rows."""
    policy_dir = Path(policy_uri)
    if is_gcs(policy_uri):
        policy_dir = Path(tempfile.mkdtemp(prefix="rlhf-serve-"))
        download_directory(policy_uri, policy_dir)
    spec = read_policy_spec(policy_dir)
    config = InferenceConfig(target_sequence_length=spec.target_sequence_length,
                             prompt_sequence_length=spec.prompt_sequence_length, batch_size=batch_size,
                             instruction=spec.instruction, use_chat_template=spec.use_chat_template, device=device)
    if (policy_dir / MERGED_DIR).is_dir():
        return Generator(str(policy_dir / MERGED_DIR), config)
    return Generator(resolve_model_reference(spec.large_model_reference), config, policy_dir / ADAPTER_DIR)


def _instance_row(instance, index: int) -> dict:
    if isinstance(instance, str) and instance.strip():
        return {"input_text": instance}
    if isinstance(instance, dict):
        if isinstance(instance.get("input_text"), str) and instance["input_text"].strip():
            return {"input_text": instance["input_text"]}
        if isinstance(instance.get("prompt"), str) and instance["prompt"].strip():
            return {"input_text": instance["prompt"]}
        if "messages" in instance:
            row = {"messages": instance["messages"]}
            try:
                check_prompt(row)
            except RowError as error:
                raise BadRequest(f"instances[{index}]: {error}") from None
            return row
    raise BadRequest(f"instances[{index}]: expected a non-empty string, or an object with input_text, prompt, "
                     "or messages ending with the user's turn")


def _decoding(generator: Generator, parameters) -> InferenceConfig:
    if parameters is None:
        return generator.config
    if not isinstance(parameters, dict):
        raise BadRequest("parameters: expected an object")
    unknown = sorted(set(parameters) - set(SAMPLING_PARAMETERS))
    if unknown:
        raise BadRequest(f"parameters: unknown {', '.join(unknown)}; accepted: {', '.join(SAMPLING_PARAMETERS)}")
    config = generator.config
    if "max_new_tokens" in parameters:
        tokens = parameters["max_new_tokens"]
        if type(tokens) is not int or not 1 <= tokens <= config.target_sequence_length:
            raise BadRequest(f"parameters.max_new_tokens: a whole number from 1 to {config.target_sequence_length}")
        config = dataclasses.replace(config, target_sequence_length=tokens)
    if "temperature" in parameters or "top_p" in parameters:
        temperature, top_p = parameters.get("temperature", 1.0), parameters.get("top_p", 1.0)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
            raise BadRequest("parameters.temperature: a number of at least 0 (0 means greedy)")
        if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
            raise BadRequest("parameters.top_p: a number above 0 and at most 1")
        config = dataclasses.replace(config, sampling_strategy="temperature_sampling" if temperature else "greedy",
                                     temperature=float(temperature or 1.0), top_p=float(top_p))
    return config


def predict(generator: Generator, body) -> dict:
    """Vertex's prediction request in, its response out."""
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list) or not body["instances"]:
        raise BadRequest('expected a JSON object {"instances": [...], "parameters": {...}} with at least one instance')
    if len(body["instances"]) > MAX_INSTANCES:
        raise BadRequest(f"{len(body['instances'])} instances; at most {MAX_INSTANCES} per request")
    rows = [_instance_row(instance, i) for i, instance in enumerate(body["instances"])]
    outputs = generator.complete(rows, _decoding(generator, body.get("parameters")))
    return {"predictions": [{"prediction": o["prediction"], "ended": o["ended"], "tokens": o["prediction_tokens"]}
                            for o in outputs]}


def create_app(generator: Generator, health_route: str = "/health", predict_route: str = "/predict"):
    from flask import Flask, jsonify, request

    app = Flask("rlhf-serve")

    @app.get(health_route)
    def health():
        return jsonify(status="ok")

    @app.post(predict_route)
    def prediction():
        body = request.get_json(silent=True)
        try:
            return jsonify(predict(generator, body))
        except BadRequest as error:
            return jsonify(error=str(error)), 400

    return app


def vertex_routes() -> tuple[int, str, str]:
    """Port, health route and predict route as Vertex AI sets them for a custom container."""
    return (int(os.environ.get("AIP_HTTP_PORT", "8080")), os.environ.get("AIP_HEALTH_ROUTE", "/health"),
            os.environ.get("AIP_PREDICT_ROUTE", "/predict"))
