"""Training steps from epochs, as Vertex's RLHF pipeline counts them."""

from __future__ import annotations

import math

from rlhf.errors import UserError


def steps_from_epochs(rows: int, epochs: int, batch_size: int = 64) -> int:
    """ceil(rows / batch_size) * epochs: 3000 pairs, batch 64, 30 epochs -> 1410."""
    for name, value in (("rows", rows), ("epochs", epochs), ("batch_size", batch_size)):
        if type(value) is not int or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    return math.ceil(rows / batch_size) * epochs


def resolve_steps(rows: int, steps: int | None, epochs: int | None, batch_size: int, what: str) -> int:
    """The step count for a stage given either steps or epochs (exactly one of them)."""
    if steps is not None and epochs is not None:
        raise UserError(f"{what}: give steps or epochs, not both")
    if steps is not None:
        if type(steps) is not int or steps < 1:
            raise UserError(f"{what}: steps must be a positive integer, got {steps!r}")
        return steps
    if epochs is None:
        raise UserError(f"{what}: give steps or epochs")
    return steps_from_epochs(rows, epochs, batch_size)


DEFAULT_TRAIN_STEPS = 1000  # Vertex's default for both stages


def resolve_stage_steps(rows: int, steps: int, epochs: int, batch_size: int, what: str) -> int:
    """The step count from pipeline parameters: epochs when given (above 0), else the steps.

    Steps always hold a value (their default is Vertex's 1000), so epochs take precedence; `rlhf run` and
    `rlhf submit` refuse a user who gives both.
    """
    if epochs < 0:
        raise UserError(f"{what}: epochs must not be negative, got {epochs}")
    if epochs:
        return steps_from_epochs(rows, epochs, batch_size)
    return resolve_steps(rows, steps, None, batch_size, what)
