"""The tiny base model of TL-Training's CPU default, "tiny-tool-use": a tiny Qwen2 that knows the tool-call format
but none of the CPU task's tools, as the paper's pretrained CodeLlama knows calls but not its tools.

It is pretrained by TL-Training's own SFT stage (`tl_training.run_sft`, plain SFT), so this module imports
tl_training; tl_training never imports it at module level.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import tl_training as tl
from common.cache import build_once, config_key, rebuild_shipped
from tasks.tool_use import (PAPER_SEARCH, SIGNATURES_CHAT_TEMPLATE, TRAVEL, ToolUseTask, copying_drill, tiny_corpus,
                            without_tools)


@dataclass(frozen=True)
class TinyBase:
    """How "tiny-tool-use" is made: a random tiny Qwen2 (common.models.build_tiny_model, 194k parameters, its
    tokenizer trained on both domains' text, SIGNATURES_CHAT_TEMPLATE as its chat template) given plain SFT, by
    `tl_training.run_sft`, on TRAVEL's calls with hundreds of values per string parameter (`copying_drill`) and
    no tool list in the prompt. Like the paper's pretrained CodeLlama it then knows the call format, picks a tool
    from the query's wording and copies the quoted values into the call (held-out TRAVEL queries, tool list
    shown: 97% tool selection and 69% exact calls for an earlier build; the shipped build's are in its card), but
    knows none of PAPER_SEARCH's tools. With TRAVEL's own 20
    values per parameter the copying never forms (3% exact calls: the model writes the most frequent value, and
    on the CPU task content filling stays near chance); copying appears after about 600 of the 1,500 steps.
    Shipped in models/tiny-tool-use; `python -m tasks.tiny_tool_use --rebuild` rebuilds it (about 3 minutes on
    one core)."""

    conversations: int = 24000
    epochs: float = 2.0
    batch_size: int = 32
    lr: float = 3e-3
    hidden_size: int = 64
    num_layers: int = 2
    vocab_size: int = 2048
    eval_queries: int = 200  # held-out TRAVEL queries the build is evaluated on
    seed: int = 0

    def key(self) -> str:
        return config_key([dataclasses.asdict(self), dataclasses.asdict(PAPER_SEARCH), dataclasses.asdict(TRAVEL),
                           SIGNATURES_CHAT_TEMPLATE])


def tiny_base(base: TinyBase, out_dir: Path) -> Path:
    """`out_dir`, holding the tiny base model; built there if missing."""
    return build_once(out_dir, lambda folder: _pretrain(base, folder))


def _pretrain(base: TinyBase, folder: Path) -> None:
    import tempfile

    from common.models import build_tiny_model, load_tokenizer

    args = tl.parse_args([])  # the CPU scale's settings, then the pretraining's below
    with tempfile.TemporaryDirectory() as work:
        initial = Path(work) / "initial"
        build_tiny_model(initial, tiny_corpus([PAPER_SEARCH, TRAVEL]), hidden_size=base.hidden_size,
                         num_layers=base.num_layers, vocab_size=base.vocab_size, seed=base.seed)
        tokenizer = load_tokenizer(str(initial))
        tokenizer.chat_template = SIGNATURES_CHAT_TEMPLATE
        tokenizer.save_pretrained(initial)
        # clean calls: nothing to execute, nothing to cache
        task = ToolUseTask(copying_drill(TRAVEL, load_tokenizer(str(initial))), base.seed, adverse_rate=0.0,
                           max_calls=1, answers=False)
        pretraining = dataclasses.replace(
            args, dtype="float32", gradient_checkpointing=False, seed=base.seed, sft_epochs=base.epochs,
            sft_batch_size=base.batch_size, sft_micro_batch_size=base.batch_size, sft_lr=base.lr,
            sft_warmup_ratio=0.05, sft_weight_decay=0.0, checkpoint_every=100, max_new_tokens=32)
        eval_targets = [t for c in task.conversations(base.eval_queries, "test") for t in tl.call_targets(c)]
        model_dir, evaluation = tl.run_sft(pretraining, Path(work) / "pretraining", str(initial),
                                           without_tools(task.conversations(base.conversations, "train")),
                                           mae=False, w_max=1.0, eval_targets=eval_targets)
        for path in model_dir.iterdir():
            if path.name != "evaluation.json":
                shutil.move(path, folder / path.name)
    record = {"config": dataclasses.asdict(base), "key": base.key(), "evaluation": evaluation}
    (folder / "tiny_base.json").write_text(json.dumps(record, indent=2))


def rebuild() -> Path:
    """Rebuild models/tiny-tool-use, with its card."""
    base = TinyBase()

    def build(folder: Path) -> str:
        _pretrain(base, folder)
        evaluation = json.loads((folder / "tiny_base.json").read_text())["evaluation"]
        return (f"on {base.eval_queries} held-out TRAVEL queries with the tool list shown, greedy: "
                f"{evaluation['eval/tool_selection']:.1%} right tool, {evaluation['eval/accuracy']:.1%} exact calls "
                f"(`tiny_base.json`)")

    return rebuild_shipped("tiny-tool-use", build, DESCRIPTION, {"key": base.key(), **dataclasses.asdict(base)})


DESCRIPTION = (
    "TL-Training's CPU base model: a tiny Qwen2 (2 layers, hidden size 64) whose tokenizer is trained on both "
    "synthetic tool domains' text and whose chat template shows tools as Python signatures "
    "(`SIGNATURES_CHAT_TEMPLATE`), given plain SFT by `tl_training.run_sft` on 24,000 calls of the TRAVEL domain "
    "with hundreds of single-token values per string parameter and no tool list (`tasks/tiny_tool_use.py`, "
    "`TinyBase()`). Like the paper's pretrained CodeLlama it knows the call format and copies quoted values into "
    "calls, but none of the CPU task's tools. `python tl_training.py` starts from it (`--model tiny-tool-use`). "
    "The build takes about 3 minutes on 2 cores.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Rebuild TL-Training's shipped tiny base model in models/.")
    parser.add_argument("--rebuild", action="store_true", help="rebuild models/tiny-tool-use")
    if not parser.parse_args().rebuild:
        parser.error("pass --rebuild")
    print(rebuild())
