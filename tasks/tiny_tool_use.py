"""The tiny base model of TL-Training's CPU default, "tiny-tool-use": a tiny Qwen2 that knows the tool-call format
but none of the CPU task's tools, as the paper's pretrained CodeLlama knows calls but not its tools.

It is pretrained by TL-Training's own SFT stage (`tl_training.run_sft`, plain SFT), so this module imports
tl_training; tl_training never imports it at module level.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import tl_training as tl
from tasks.tool_use import (PAPER_SEARCH, SIGNATURES_CHAT_TEMPLATE, TRAVEL, ToolUseTask, copying_drill, tiny_corpus,
                            without_tools)


@dataclass(frozen=True)
class TinyBase:
    """How "tiny-tool-use" is made: a random tiny Qwen2 (common.models.build_tiny_model, 194k parameters, its
    tokenizer trained on both domains' text, SIGNATURES_CHAT_TEMPLATE as its chat template) given plain SFT, by
    `tl_training.run_sft`, on TRAVEL's calls with hundreds of values per string parameter (`copying_drill`) and no tool
    list in the prompt. Like the paper's pretrained CodeLlama it then knows the call format, picks a tool from
    the query's wording and copies the quoted values into the call (held-out TRAVEL queries, tool list shown:
    97% tool selection, 69% exact calls), but knows none of PAPER_SEARCH's tools. With TRAVEL's own 20 values
    per parameter the copying never forms (3% exact calls: the model writes the most frequent value, and on the
    CPU task content filling stays near chance); copying appears after about 600 of the 1,500 steps. Built once
    (about 3 minutes on one core) and cached."""

    conversations: int = 24000
    epochs: float = 2.0
    batch_size: int = 32
    lr: float = 3e-3
    hidden_size: int = 64
    num_layers: int = 2
    vocab_size: int = 2048
    seed: int = 0

    def key(self) -> str:
        from common.cache import config_key

        return config_key([dataclasses.asdict(self), dataclasses.asdict(PAPER_SEARCH), dataclasses.asdict(TRAVEL),
                           SIGNATURES_CHAT_TEMPLATE])


def tiny_base(args: tl.Args, base: TinyBase = TinyBase()) -> str:
    """The directory of the "tiny-tool-use" base model, built once (about 3 minutes on one core) and cached."""
    from common.cache import CACHE_DIR, build_once

    print(f"the tiny base model tiny-tool-use-{base.key()} (built once, about 3 minutes)")
    return str(build_once(CACHE_DIR / f"tiny-tool-use-{base.key()}", lambda folder: _pretrain(args, base, folder)))


def _pretrain(args: tl.Args, base: TinyBase, folder: Path) -> None:
    import tempfile

    from common.models import build_tiny_model, load_tokenizer

    with tempfile.TemporaryDirectory() as work:
        initial = Path(work) / "initial"
        build_tiny_model(initial, tiny_corpus([PAPER_SEARCH, TRAVEL]), hidden_size=base.hidden_size,
                         num_layers=base.num_layers, vocab_size=base.vocab_size, seed=base.seed)
        tokenizer = load_tokenizer(str(initial))
        tokenizer.chat_template = SIGNATURES_CHAT_TEMPLATE
        tokenizer.save_pretrained(initial)
        # clean calls: nothing to execute, nothing to cache
        task = ToolUseTask(copying_drill(TRAVEL, load_tokenizer(str(initial))), base.seed, adverse_rate=0.0)
        pretraining = dataclasses.replace(
            args, dtype="float32", gradient_checkpointing=False, resume=False, seed=base.seed, sft_epochs=base.epochs,
            sft_batch_size=base.batch_size, sft_micro_batch_size=base.batch_size, sft_lr=base.lr,
            sft_warmup_ratio=0.05, sft_weight_decay=0.0, checkpoint_every=100, max_new_tokens=32)
        model_dir, _ = tl.run_sft(pretraining, Path(work) / "pretraining", str(initial),
                               without_tools(task.conversations(base.conversations, "train")), mae=False, w_max=1.0,
                               eval_targets=[t for c in task.conversations(200, "test") for t in tl.call_targets(c)])
        for path in model_dir.iterdir():
            shutil.move(path, folder / path.name)
