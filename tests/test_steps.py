import pytest

from rlhf.training.steps import resolve_steps, steps_from_epochs


def test_course_examples():
    assert steps_from_epochs(3000, 30, 64) == 1410
    assert steps_from_epochs(2000, 10, 64) == 320
    assert steps_from_epochs(1, 1) == 1
    assert steps_from_epochs(65, 2, 64) == 4


@pytest.mark.parametrize("rows,epochs,batch", [(0, 1, 64), (10, 0, 64), (10, 1, 0), (10, True, 64), (10.5, 1, 64)])
def test_bad_values_are_refused(rows, epochs, batch):
    with pytest.raises(ValueError):
        steps_from_epochs(rows, epochs, batch)


def test_steps_or_epochs_but_not_both():
    assert resolve_steps(100, 7, None, 64, "reward model") == 7
    assert resolve_steps(100, None, 3, 64, "reward model") == 6
    with pytest.raises(ValueError, match="not both"):
        resolve_steps(100, 7, 3, 64, "reward model")
    with pytest.raises(ValueError, match="give steps or epochs"):
        resolve_steps(100, None, None, 64, "reward model")
    with pytest.raises(ValueError, match="positive"):
        resolve_steps(100, 0, None, 64, "reward model")


def test_pipeline_steps_come_from_epochs_when_given_else_from_the_steps():
    from rlhf.training.steps import DEFAULT_TRAIN_STEPS, resolve_stage_steps

    assert resolve_stage_steps(3000, DEFAULT_TRAIN_STEPS, 30, 64, "reward model") == 1410
    assert resolve_stage_steps(2000, DEFAULT_TRAIN_STEPS, 0, 64, "reinforcement learning") == 1000
    assert resolve_stage_steps(2000, 7, 0, 64, "reinforcement learning") == 7
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        resolve_stage_steps(2000, 0, 0, 64, "reward model")
    with pytest.raises(ValueError, match="epochs must not be negative"):
        resolve_stage_steps(2000, 10, -1, 64, "reward model")
