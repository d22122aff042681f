"""The long task's outcome reward model: read at each answer's last token, trained there by regression on the
base's own scored samples, saved as a value model that vapo.py's --value-model loads."""

import json

import pytest
import torch

from tasks.chains import ChainTask
from tasks.tiny_chains_orm import OutcomeRewardModel, build, last_token_values


def test_the_value_at_each_answers_last_token():
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert last_token_values(values, mask).tolist() == pytest.approx([0.2, 0.8])


def test_the_build_trains_the_head_at_the_last_token_and_vapo_loads_it_as_its_critic(tiny_model_dir, tmp_path):
    from common.models import load_value_model

    config = OutcomeRewardModel(task=ChainTask(max_steps=3), train_prompts=4, samples_per_prompt=2, eval_prompts=2,
                                max_new_tokens=8, epochs=4, batch_size=4, lr=1e-2, base_dir=str(tiny_model_dir))
    record = build(config, tmp_path / "orm")
    # a random tiny model answers nothing right: every reward is -1, which the head learns
    assert record["train_accuracy"] == 0.0 and record["steps"] == 8 and record["loss_last"] < record["loss_first"]
    assert json.loads((tmp_path / "orm" / "reward_model.json").read_text())["key"] == config.key()
    assert "base_dir" not in record["config"]
    critic = load_value_model(str(tmp_path / "orm"))  # the trained head loads: no head is newly initialised
    fresh = load_value_model(str(tiny_model_dir))
    assert not torch.equal(critic.score.weight, fresh.score.weight)
