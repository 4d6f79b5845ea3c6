"""The trainer entrypoint's choice between the fine-tune and the base model (containers/trainer/task.py)."""

from __future__ import annotations

import pytest

from tests.helpers import container_task


@pytest.fixture(scope="module")
def trainer_task():
    # The container runs it as ``python -m task`` from its own folder: load it by path under a private name.
    return container_task("trainer")


def test_ships_the_fine_tune_only_when_it_beats_the_base(trainer_task):
    tuned, reason = trainer_task.choose_model(0.40, 0.45)
    assert tuned is True
    assert "0.4500 > base 0.4000" in reason and "ndcg@10" in reason


def test_ships_the_base_when_the_fine_tune_is_worse(trainer_task):
    tuned, reason = trainer_task.choose_model(0.45, 0.40)
    assert tuned is False
    assert "base model ships" in reason


def test_a_tie_ships_the_base(trainer_task):
    tuned, reason = trainer_task.choose_model(0.5, 0.5)
    assert tuned is False and "did not beat" in reason


@pytest.mark.parametrize("base,tuned_score", [(None, None), (0.3, None), (None, 0.3)])
def test_with_nothing_to_check_it_on_the_base_model_ships_never_an_unchecked_fine_tune(trainer_task, base, tuned_score):
    tuned, reason = trainer_task.choose_model(base, tuned_score)
    assert tuned is False and "too few training pairs to check a fine-tune" in reason


def test_zero_scores_are_scores_not_missing(trainer_task):
    # 0.0 is a real (bad) score: a fine-tune at 0 must not count as "nothing to check", nor a base at 0
    assert trainer_task.choose_model(0.2, 0.0)[0] is False
    tuned, reason = trainer_task.choose_model(0.0, 0.1)
    assert tuned is True and "too few" not in reason
