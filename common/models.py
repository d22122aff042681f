"""Policy and value models, their tokenizer, and the tiny CPU model.

Every script loads models through `load_policy` and `load_value_model`, which take a hub id or a local
directory. The tiny model is an ordinary Qwen2 checkpoint written to a directory by `build_tiny_model`
and loaded by path like any other, so the CPU default and a Qwen2.5-32B run go through the same code.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.utils import logging as transformers_logging

from common.distributed import rank

# Qwen2.5-Instruct's chat template, verbatim (tokenizer_config.json of the Qwen2.5 instruct models),
# tools and tool calls included. The tiny tokenizer uses it so that chat formatting, tool calls and
# their parsing are exactly what a real Qwen2.5 sees.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and '
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    '\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Qwen2.5's special tokens: <|endoftext|> pads (and ends base-model text), <|im_end|> ends a chat turn.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TOOL_CALL_TAGS = ["<tool_call>", "</tool_call>"]


class ModelNotFoundError(OSError):
    """A model or tokenizer could be found neither as a local directory nor on a reachable hub."""


def _not_found(name_or_path: str, what: str, cause: Exception) -> ModelNotFoundError:
    local = Path(name_or_path).expanduser()
    return ModelNotFoundError(
        f"Could not load the {what} '{name_or_path}'. Tried it as a local directory "
        f"({'exists but holds no usable files' if local.exists() else 'no such directory'}) and as a "
        f"Hugging Face Hub id (the hub could not be reached or has no such repository: "
        f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}). "
        f"Offline, download the model elsewhere (`huggingface-cli download {name_or_path} --local-dir DIR`), "
        f"copy DIR here and pass its path instead."
    )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model, left-padded for generation (the padding side is not saved to disk)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as error:
        raise _not_found(name_or_path, "tokenizer", error) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(
    name_or_path: str,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a hub id or a local directory.

    `dtype` is a torch dtype name ("float32", "bfloat16") or "auto" (the checkpoint's own). Under
    `accelerate launch` the caller passes the model to `accelerator.prepare`, which places and shards
    it; `device` only serves single-process use (tests, notebooks).
    """
    tokenizer = load_tokenizer(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_dtype(dtype))
    except OSError as error:
        raise _not_found(name_or_path, "policy model", error) from error
    _configure(model, gradient_checkpointing, device)
    return model, tokenizer


def load_value_model(
    name_or_path: str,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
    device: torch.device | str | None = None,
) -> PreTrainedModel:
    """A value model: the causal-LM backbone with a scalar head on every token.

    It is `AutoModelForTokenClassification` with one label, so it saves and loads with
    `save_pretrained`/`from_pretrained`. From a policy checkpoint the head starts random; from a reward
    model (`AutoModelForSequenceClassification`, whose head is also named `score`) the head and the
    backbone both load, which is how VAPO initialises its critic (VAPO §5.1).
    Head dropout is off: a value target must not be noised.
    """
    try:
        config = AutoConfig.from_pretrained(name_or_path)
        config.num_labels = 1
        config.classifier_dropout = 0.0
        config.problem_type = "regression"
        # transformers reports the new head as a table of MISSING keys; one line below says the same
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            model, loading = AutoModelForTokenClassification.from_pretrained(
                name_or_path, config=config, dtype=_dtype(dtype), output_loading_info=True)
        finally:
            transformers_logging.set_verbosity(verbosity)
    except OSError as error:
        raise _not_found(name_or_path, "value model", error) from error
    if loading["missing_keys"] and rank() == 0:
        print(f"value model from {name_or_path}: {', '.join(sorted(loading['missing_keys']))} newly initialised "
              "(a policy checkpoint has no value head; a reward model's loads)")
    _configure(model, gradient_checkpointing, device)
    return model


def token_values(value_model: PreTrainedModel, batch) -> torch.Tensor:
    """V(s_t) for every response token t of a `RolloutBatch`, shape (B, T).

    The value of the state *before* token t is read at the position before it, exactly as the
    log-prob of token t comes from the logits there.
    """
    out = value_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return batch.response_states(out.logits.squeeze(-1).float())


def _dtype(name: str):
    return name if name == "auto" else getattr(torch, name)


def _configure(model: PreTrainedModel, gradient_checkpointing: bool, device) -> None:
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if device is not None:
        model.to(device)


# --------------------------------------------------------------------------------------------------
# The tiny model: Qwen2 architecture from a small config, with a byte-level BPE tokenizer built here.
# --------------------------------------------------------------------------------------------------

# Qwen2's pre-tokenization (transformers' `Qwen2Tokenizer`): the tiny tokenizer splits text exactly as
# Qwen2.5 does, so `AutoTokenizer` rebuilds it as a `Qwen2Tokenizer` with identical ids.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def build_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A Qwen2-style byte-level BPE tokenizer with a small vocabulary trained on `corpus`.

    Same normalizer, pre-tokenizer (digits one by one), byte fallback, special tokens and chat
    template as Qwen2.5; only the merges differ. Training is deterministic for a given corpus.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START],
    )
    fast.add_tokens(TOOL_CALL_TAGS)  # Qwen2.5 has them as single, non-special tokens
    fast.chat_template = QWEN25_CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


# Text every tiny tokenizer learns its merges from, beside its task's own: Qwen2.5's chat and tool-call scaffolding.
CHAT_SCAFFOLDING = [
    QWEN25_CHAT_TEMPLATE,
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
    "<|im_start|>user\n", "<|im_start|>assistant\n", "\n<tool_response>\n", "\n</tool_response>",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
    "# Tools\n\nYou may call one or more functions to assist with the user query.",
    '{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object", '
    '"properties": {"x": {"type": "string", "description": "the x"}}, "required": ["x"]}}}',
]


def build_tiny_model(
    out_dir: str | os.PathLike,
    corpus: list[str],
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    config_overrides: dict | None = None,
) -> Path:
    """Write a randomly initialised tiny Qwen2 and its tokenizer, trained on `corpus`, to `out_dir`; load it by path.

    The config differs from Qwen2.5-0.5B's only in sizes (Qwen2.5 also ties embeddings at small sizes
    and uses grouped-query attention). `config_overrides` sets any other `Qwen2Config` field, e.g. a real
    model's shape and vocabulary (ids the tokenizer lacks decode to nothing).
    """
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(corpus, vocab_size)
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)],
        pad_token_id=tokenizer.pad_token_id,
    )
    # given to the constructor, not set afterwards: fields such as layer_types are derived from the sizes
    config = Qwen2Config(**(fields | (config_overrides or {})))
    torch.manual_seed(seed)
    # a private copy: from_config may write attention settings into the config it is given
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir

