"""tasks/chains.py, VAPO's long CPU world: the text of a chain and of its solution, the answer read from the last
line, the length buckets, the warm-start builder (a tiny config in a tmp dir), the shipped models/tiny-chains, and
vapo.py's cpu-long scale with its per-bucket accuracy."""

import json
from pathlib import Path

import pytest

from common.rewards import check_math_answer
from tasks.chains import (LENGTH_BUCKETS, ChainTask, ChainWarmStart, Move, bucket_accuracy, chain_row,
                          length_bucket, warm_start)


def test_a_chain_applies_its_two_moves_in_turns_and_its_solution_writes_each_step_then_the_answer():
    row = chain_row(7, 37, (Move("+", 8), Move("-", 5)), 3)
    assert row["prompt"][-1] == {"role": "user", "content": "Start at 37. In turns +8 and -5: 3 steps."}
    assert row["solution"] == "3. 37+8=45\n2. 45-5=40\n1. 40+8=48\nAnswer: 48"  # numbered by the steps to go
    assert row["reward_model"] == {"style": "rule", "ground_truth": "48"}
    assert row["extra_info"] == {"index": 7, "num_steps": 3}


def test_the_rows_stay_in_range_and_train_and_test_are_disjoint_streams():
    task = ChainTask()
    train, test = task.rows(300, "train"), task.rows(300, "test")
    assert train == task.rows(300, "train")  # seeded
    assert {r["prompt"][-1]["content"] for r in train}.isdisjoint(r["prompt"][-1]["content"] for r in test)
    steps = [r["extra_info"]["num_steps"] for r in train]
    assert min(steps) == 2 and max(steps) == 40
    for row in train:
        lines = row["solution"].splitlines()
        assert len(lines) == row["extra_info"]["num_steps"] + 1
        assert [line.split(".")[0] for line in lines[:-1]] == [str(n) for n in range(len(lines) - 1, 0, -1)]
        totals = [int(line.rsplit("=", 1)[1]) for line in lines[:-1]]
        assert all(0 <= t <= 99 for t in totals) and lines[-1] == f"Answer: {totals[-1]}"
        ops = [line.split(" ")[1].strip("0123456789=")[0] for line in lines[:-1]]
        assert all(a != b for a, b in zip(ops, ops[1:]))  # the moves alternate


def test_the_answer_is_checked_on_the_last_line():
    row = ChainTask().rows(1, "test")[0]
    gold = row["reward_model"]["ground_truth"]
    assert check_math_answer(row["solution"], gold).correct
    wrong = str((int(gold) + 1) % 100)
    assert not check_math_answer(row["solution"].rsplit("\n", 1)[0] + f"\nAnswer: {wrong}", gold).correct
    # a chain cut off before its answer line has no answer, even if its last running total is right
    assert not check_math_answer(row["solution"].rsplit("\n", 1)[0], gold).correct


def test_length_buckets_cover_every_chain_once_and_accuracy_is_per_bucket():
    names = [length_bucket(n) for n in range(2, 41)]
    assert names[0] == "2-5" and names[-1] == "31-40" and len(set(names)) == len(LENGTH_BUCKETS)
    with pytest.raises(ValueError):
        length_bucket(41)
    assert bucket_accuracy([2, 5, 6, 40, 33], [True, False, True, False, True]) == {
        "2-5": 0.5, "6-10": 1.0, "31-40": 0.5}


def test_vapo_reports_accuracy_per_length_bucket():
    import vapo

    metrics = vapo.length_bucket_accuracy([3, 4, 12, 12, 12, 35], [True, True, False, True, False, False])
    assert metrics == {"eval/accuracy_len_2-5": 1.0, "eval/accuracy_len_11-20": 1 / 3, "eval/accuracy_len_31-40": 0.0}


def test_the_cpu_long_scale_trains_the_chains_base_on_chains():
    import vapo

    args = vapo.parse_args(["--scale", "cpu-long"])
    assert (args.model, args.data, args.eval_data) == ("tiny-chains", "synthetic-chains", "synthetic-chains")
    assert args.max_new_tokens > 510  # the longest gold solution fits
    assert vapo.resolve_model("tiny-chains").endswith("tiny-chains")
    rows = vapo.load_prompts("synthetic-chains", "test")
    assert len(rows) == 1000 and rows[:3] == ChainTask().rows(3, "test")


def test_the_builder_continues_its_base_and_keeps_a_model_inside_the_window(tiny_model_dir, tmp_path):
    # a random tiny model never reaches 10%, so this window starts at 0%: the build keeps the first evaluation
    config = ChainWarmStart(task=ChainTask(max_steps=3), short_task=ChainTask(max_steps=2), train_rows=16,
                            eval_rows=6, batch_size=4, micro_batch_size=2, max_steps=2, eval_every=1,
                            max_new_tokens=40, target_accuracy=1.0, accuracy_window=(0.0, 1.0),
                            base_dir=str(tiny_model_dir))
    folder = warm_start(config, tmp_path / "chains")
    record = json.loads((folder / "warm_start.json").read_text())
    assert record["key"] == config.key() and [h["step"] for h in record["history"]] == [1, 2]
    assert record["step"] == 2 and set(record["buckets"]) <= {"2-5"}
    assert "base_dir" not in record["config"]
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}


def test_the_shipped_chains_base_was_kept_inside_its_window_and_its_card_gives_accuracy_by_length():
    # its key, checksum and rebuild command are checked with the other shipped models (test_shipped_models.py)
    from common.cache import shipped_model

    folder = Path(shipped_model("tiny-chains"))
    record = json.loads((folder / "warm_start.json").read_text())
    low, high = ChainWarmStart().accuracy_window
    assert low <= record["accuracy"] <= high and list(record["buckets"]) == [f"{a}-{b}" for a, b in LENGTH_BUCKETS]
    card = (folder / "CARD.md").read_text()
    assert all(f"{name} operations {accuracy:.0%}" in card.replace("\n  ", " ")
               for name, accuracy in record["buckets"].items())


def test_the_task_is_long_for_the_tiny_tokenizer():
    from common.cache import shipped_model
    from common.models import load_tokenizer

    tokenizer = load_tokenizer(shipped_model("tiny-arithmetic"))
    rows = ChainTask().rows(200, "test")
    lengths = [len(tokenizer(r["solution"])["input_ids"]) for r in rows]
    assert min(lengths) < 40 and max(lengths) > 400  # heterogeneous lengths within one batch
