"""The tiny base models shipped in models/: each is what its builder's config describes and what its card says,
the scripts load it by name, a missing one names its rebuild command; the builders work (tiny configs, tmp dirs)."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

import common.cache
from common.cache import REBUILD_COMMANDS, build_once, rebuild_shipped, shipped_model

RECORDS = {"tiny-arithmetic": "warm_start.json", "tiny-arithmetic-quick": "warm_start.json",
           "tiny-tool-use": "tiny_base.json", "tiny-textcraft": "warm_start.json",
           "tiny-chains": "warm_start.json", "tiny-chains-orm": "reward_model.json"}


def default_keys() -> dict[str, str]:
    """The key of each shipped model's config as its builder defines it today."""
    from tasks import arithmetic
    from tasks.chains import ChainWarmStart
    from tasks.tiny_textcraft import WarmStart
    from tasks.tiny_chains_orm import OutcomeRewardModel
    from tasks.tiny_tool_use import TinyBase

    return {"tiny-arithmetic": arithmetic.SHIPPED["tiny-arithmetic"].key(),
            "tiny-arithmetic-quick": arithmetic.SHIPPED["tiny-arithmetic-quick"].key(),
            "tiny-tool-use": TinyBase().key(), "tiny-textcraft": WarmStart().key(),
            "tiny-chains": ChainWarmStart().key(), "tiny-chains-orm": OutcomeRewardModel().key()}


@pytest.mark.parametrize("name", sorted(REBUILD_COMMANDS))
def test_each_shipped_model_is_its_builders_default_and_its_card_has_its_checksum_and_rebuild_command(name):
    folder = Path(shipped_model(name))
    record = json.loads((folder / RECORDS[name]).read_text())
    assert record["key"] == default_keys()[name], f"models/{name} is not built from its builder's current config"
    card = (folder / "CARD.md").read_text()
    assert f"`{REBUILD_COMMANDS[name]}`" in card
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() in card
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    ignored = subprocess.run(["git", "check-ignore", "-q", str(folder / "model.safetensors")], cwd=folder)
    assert ignored.returncode != 0, f"models/{name} is ignored by git"


def test_the_scripts_load_the_shipped_models_by_name():
    import agent_r
    import evals
    import tl_training
    import vapo

    models = common.cache.MODELS_DIR
    assert vapo.resolve_model("tiny-arithmetic") == str(models / "tiny-arithmetic")
    assert vapo.resolve_model("tiny-chains-orm") == str(models / "tiny-chains-orm")
    assert evals.resolve_model("tiny-arithmetic") == str(models / "tiny-arithmetic")
    assert tl_training.resolve_model(tl_training.parse_args([])) == str(models / "tiny-tool-use")
    assert agent_r.resolve_model(agent_r.parse_args([])) == str(models / "tiny-textcraft")
    assert (Path(agent_r.resolve_general_data(agent_r.parse_args([]), str(models / "tiny-textcraft")))).is_file()


def test_a_missing_shipped_model_names_the_command_that_rebuilds_it(tmp_path, monkeypatch):
    monkeypatch.setattr(common.cache, "MODELS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tiny-tool-use is missing.*`python -m tasks.tiny_tool_use --rebuild`"):
        shipped_model("tiny-tool-use")


def test_build_once_builds_once_and_a_failed_rebuild_keeps_the_old_model(tmp_path):
    from safetensors.torch import save_file

    calls = []

    def build(folder):
        calls.append(folder)
        save_file({"w": torch.ones(3)}, folder / "model.safetensors")
        return "nothing measured"

    assert build_once(tmp_path / "a", build) == build_once(tmp_path / "a", build) == tmp_path / "a"
    assert len(calls) == 1 and [p.name for p in tmp_path.iterdir()] == ["a"]  # no scratch folder left behind

    shipped = rebuild_shipped("tiny-arithmetic", build, "A test model.", {"x": 1}, models_dir=tmp_path)
    card = (shipped / "CARD.md").read_text()
    assert "A test model." in card and "nothing measured" in card and '"x": 1' in card and "3 parameters" in card
    assert hashlib.sha256((shipped / "model.safetensors").read_bytes()).hexdigest() in card

    def broken(folder):
        raise RuntimeError("killed halfway")

    with pytest.raises(RuntimeError):
        rebuild_shipped("tiny-arithmetic", broken, "A test model.", {"x": 1}, models_dir=tmp_path)
    assert (shipped / "CARD.md").read_text() == card  # the old model is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "tiny-arithmetic"]  # and no half-built folder is left


def test_the_tool_use_builder_pretrains_a_base_with_the_signatures_template(tmp_path):
    from common.models import load_tokenizer
    from tasks.tiny_tool_use import TinyBase, tiny_base
    from tasks.tool_use import SIGNATURES_CHAT_TEMPLATE

    base = TinyBase(conversations=32, epochs=1.0, batch_size=16, eval_queries=4)
    folder = tiny_base(base, tmp_path / "base")
    record = json.loads((folder / "tiny_base.json").read_text())
    assert record["key"] == base.key() and 0.0 <= record["evaluation"]["eval/accuracy"] <= 1.0
    assert load_tokenizer(str(folder)).chat_template == SIGNATURES_CHAT_TEMPLATE
    assert (folder / "model.safetensors").is_file() and not (folder / "evaluation.json").exists()


def test_the_textcraft_builder_writes_the_agent_and_its_general_chats(tmp_path):
    from agent_r import REVISION_THOUGHTS
    from common.models import load_policy
    from tasks.tiny_textcraft import WarmStart, warm_start

    config = WarmStart(demonstrations=20, verifier_examples=20, sentence_examples=5, steps=2, hidden_size=32,
                       num_layers=1, vocab_size=600)
    folder = warm_start(config, tmp_path / "agent")
    record = json.loads((folder / "warm_start.json").read_text())
    assert record["key"] == config.key() and record["final_loss"] > 0
    chats = [json.loads(line)["messages"] for line in (folder / "general.jsonl").read_text().splitlines()]
    assert [chat[-1]["content"] for chat in chats[-5:]] == list(REVISION_THOUGHTS[:5])  # the revision sentences
    assert len(chats) > 5 and all("\nJudgment: " in chat[-1]["content"] for chat in chats[:-5])  # verifier answers
    model, _ = load_policy(str(folder))
    assert model.config.num_hidden_layers == 1
