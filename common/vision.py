"""Vision-language models: sampling with an image in the prompt, on transformers or vLLM, and a tiny one.

A prompt is a list of chat messages whose content may be a list of parts, transformers' multi-modal
chat format:

    [{"role": "user", "content": [{"type": "image", "image": <PIL image>}, {"type": "text", "text": "..."}]}]

Both samplers render it with the model's processor and chat template (which writes the model's image
placeholder where the image part is) and hand the images over beside the text: transformers' processor
turns them into pixel values and expands each placeholder to the image's tokens; vLLM takes
`{"prompt_token_ids": ..., "multi_modal_data": {"image": ...}}` and does the same inside the engine. They
return `common.sampling.Sample`s, like the text samplers, and say `accepts_images = True`.

The tiny model (`build_tiny_vlm`) is an Idefics3 architecture (a SigLIP-style vision tower, a pixel-shuffle
connector and a Llama text model) with 0.2M parameters, the project's byte-level BPE
tokenizer and a ChatML template. Idefics3 is chosen because its processor needs only PIL and numpy (the
Qwen2-VL family's processors require torchvision, which does not install beside this torch build) and
because vLLM's CPU build can run it.
"""

from __future__ import annotations

import base64
import copy
import io
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from common.sampling import Sample, cut_response, end_token_ids, require_vllm

# ChatML, as the tiny text model's, with an image part written as Idefics3's placeholder.
TINY_VLM_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<image>' }}{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
IMAGE_SIDE = 56  # pixels: the vision tower sees 4 x 4 patches of 14, shuffled into 4 image tokens


class ImageError(ValueError):
    """A value that should be an image cannot be read as one."""


def load_image(value, base_dir: Path | None = None):
    """An RGB PIL image from what a dataset may hold: a PIL image; `{"bytes": ..., "path": ...}` (how
    `datasets` stores an Image feature); raw bytes; a file path (relative ones from `base_dir`); a
    base64 string or a `data:image/...;base64,` URL."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        return load_image(value["bytes"] or value["path"], base_dir)
    if isinstance(value, str) and value.startswith("data:image"):
        value = value.split(",", 1)[-1]
    if isinstance(value, str):
        path = Path(value).expanduser()
        path = path if path.is_absolute() or base_dir is None else base_dir / path
        if len(value) < 1024 and path.is_file():
            value = path.read_bytes()
        else:
            try:
                value = base64.b64decode(value, validate=True)
            except ValueError as error:
                raise ImageError(f"{value[:80]!r} is neither an image file that exists nor base64 image data") from error
    if not isinstance(value, bytes):
        raise ImageError(f"a {type(value).__name__} is not an image; give a PIL image, image bytes, "
                         f"{{'bytes': ..., 'path': ...}}, a file path or base64 data")
    try:
        return Image.open(io.BytesIO(value)).convert("RGB")
    except UnidentifiedImageError as error:
        raise ImageError(f"{len(value)} bytes that are no image format PIL reads") from error


def prompt_images(messages) -> list:
    """The images of a chat prompt, in the order their parts appear (a plain-text prompt has none)."""
    if not messages or not isinstance(messages[0], dict):
        return []
    return [part["image"] for message in messages if not isinstance(message["content"], str)
            for part in message["content"] if part.get("type") == "image"]


def is_vision_language_model(name_or_path: str) -> bool:
    """Whether a checkpoint's config describes a model with a vision tower."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):  # not found, or no config: the text model's loader says why
        return False
    return getattr(config, "vision_config", None) is not None


def load_processor(name_or_path: str):
    """The model's processor (image processor, tokenizer, chat template), left-padding for generation."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path)
    processor.tokenizer.padding_side = "left"
    return processor


class _Job(NamedTuple):
    """One sample to generate: its prompt's index, the prompt's rendered chat template and its images."""

    prompt_index: int
    text: str
    images: list


class HFVisionSampler:
    """transformers `generate` on a vision-language model, chunks of `batch_size` sequences; a chunk holds
    prompts that all have an image or all have none, as a processor takes either kind of batch."""

    accepts_images = True

    def __init__(self, model, processor, batch_size: int = 8):
        self.model, self.processor, self.batch_size = model, processor, batch_size
        self.tokenizer = processor.tokenizer
        self.end_ids = end_token_ids(self.tokenizer, getattr(model, "generation_config", None))

    @torch.no_grad()
    def generate(self, prompts: Sequence, n: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (), tools=None) -> list[Sample]:
        """`n` samples per prompt, prompt-major; temperature 0 is greedy. No log-probs are kept (evaluation
        needs none, and holding every step's scores for long responses of a large vocabulary would not fit)."""
        texts = [self.processor.apply_chat_template(list(p), tools=tools, add_generation_prompt=True, tokenize=False)
                 for p in prompts]
        jobs = [_Job(i, texts[i], prompt_images(p)) for i, p in enumerate(prompts) for _ in range(n)]
        with_images, without = [j for j in jobs if j.images], [j for j in jobs if not j.images]
        chunks = [kind[start:start + self.batch_size] for kind in (with_images, without)
                  for start in range(0, len(kind), self.batch_size)]
        device = next(self.model.parameters()).device
        samples: list[Sample] = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            for chunk in chunks:
                samples += self._generate_chunk(chunk, device, max_new_tokens, temperature, top_p, list(stop))
        return sorted(samples, key=lambda sample: sample.prompt_index)  # stable: each prompt's samples in order

    def _generate_chunk(self, jobs, device, max_new_tokens, temperature, top_p, stop) -> list[Sample]:
        images = [job.images for job in jobs] if jobs[0].images else None
        inputs = self.processor(text=[job.text for job in jobs], images=images, return_tensors="pt", padding=True)
        inputs = inputs.to(device)
        greedy = temperature == 0
        # generate's default top_k=50 would change the distribution: sampling is plain temperature + top-p
        sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
        output = self.model.generate(**inputs, do_sample=not greedy, **sampling, max_new_tokens=max_new_tokens,
                                     eos_token_id=self.end_ids, pad_token_id=self.tokenizer.pad_token_id)
        generated = output[:, inputs["input_ids"].shape[1]:]
        samples = []
        for row, job in enumerate(jobs):
            prompt_ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
            response, finish = cut_response(generated[row].tolist(), self.end_ids, stop, self.tokenizer)
            samples.append(Sample(job.prompt_index, prompt_ids, response,
                                  self.tokenizer.decode(response, skip_special_tokens=True), finish))
        return samples


class VLLMVisionSampler:
    """vLLM on a vision-language model: each prompt goes in as the token ids of its rendered chat template
    (the image placeholder not yet expanded) with its images as `multi_modal_data`, vLLM's documented
    multi-modal input; the engine runs the model's processor on them. `engine_kwargs` go to `vllm.LLM`."""

    accepts_images = True

    def __init__(self, model_name_or_path: str, processor, **engine_kwargs):
        require_vllm()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, as VLLMSampler's
        from vllm import LLM

        self.processor, self.tokenizer = processor, processor.tokenizer
        self.end_ids = end_token_ids(self.tokenizer)
        # the engine needs the model's processor for images, so it loads the tokenizer too; it reserves
        # memory for one image per prompt, what RoR-Bench has
        self.llm = LLM(model=model_name_or_path, limit_mm_per_prompt={"image": 1}, **engine_kwargs)

    def generate(self, prompts: Sequence, n: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (), tools=None) -> list[Sample]:
        from vllm import SamplingParams

        requests = []
        for prompt in prompts:
            text = self.processor.apply_chat_template(list(prompt), tools=tools, add_generation_prompt=True,
                                                      tokenize=False)
            request = {"prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}
            images = prompt_images(prompt)
            if len(images) > 1:
                raise ValueError(f"a prompt has {len(images)} images; the engine is set up for one per prompt")
            if images:
                request["multi_modal_data"] = {"image": images[0]}
            requests.append(request)
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                top_k=0 if temperature > 0 else 1, max_tokens=max_new_tokens, seed=seed,
                                stop_token_ids=self.end_ids, logprobs=0, detokenize=False)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        samples = []
        for index, output in enumerate(outputs):
            for completion in output.outputs:
                tokens = list(completion.token_ids)
                response, finish = cut_response(tokens, self.end_ids, list(stop), self.tokenizer)
                logprobs = [entry[token].logprob for entry, token in zip(completion.logprobs or [], tokens)]
                text = self.tokenizer.decode(response, skip_special_tokens=True)
                samples.append(Sample(index, list(output.prompt_token_ids), response, text, finish,
                                      logprobs[: len(response)]))
        return samples


def load_vision_sampler(name_or_path: str, backend: str, dtype: str, batch_size: int, **engine_kwargs):
    """(sampler, tokenizer) for a vision-language model: transformers' `AutoModelForImageTextToText`, or
    vLLM with `engine_kwargs` (gpu_memory_utilization, tensor_parallel_size, max_model_len, seed)."""
    processor = load_processor(name_or_path)
    if backend == "vllm":
        return VLLMVisionSampler(name_or_path, processor, dtype=dtype, **engine_kwargs), processor.tokenizer
    from transformers import AutoModelForImageTextToText

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=torch_dtype)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return HFVisionSampler(model, processor, batch_size=batch_size), processor.tokenizer


def build_tiny_vlm(out_dir: str | os.PathLike, corpus: list[str], seed: int = 0) -> Path:
    """Write a randomly initialised tiny Idefics3 vision-language model and its processor to `out_dir`.

    The text model is a Llama with Qwen2.5's special tokens and the project's tokenizer (`build_tokenizer`
    on `corpus`), plus Idefics3's image tokens; images are resized to IMAGE_SIDE pixels, one tile, no
    splitting. Its weights start wider than usual (initializer_range 0.2, not 0.02) so that a random
    model's greedy reply depends on its image: at 0.02 every image gives the same reply.
    """
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3 import Idefics3ImageProcessorPil

    from common.models import ENDOFTEXT, IM_END, IM_START, build_tokenizer

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(corpus)
    tokenizer.add_special_tokens({"additional_special_tokens": [
        IM_START, "<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]})
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": IMAGE_SIDE},
                                                max_image_size={"longest_edge": IMAGE_SIDE})
    patch, shuffle = 14, 2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=(IMAGE_SIDE // patch) ** 2 // shuffle**2,
                                  chat_template=TINY_VLM_CHAT_TEMPLATE)
    end, pad = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1,  # head size 32: vLLM's CPU attention needs >= 32
                       max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.2,
                       bos_token_id=pad, eos_token_id=end, pad_token_id=pad)
    config = Idefics3Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": IMAGE_SIDE, "patch_size": patch},
        text_config=text, scale_factor=shuffle, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=True, pad_token_id=pad)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration._from_config(copy.deepcopy(config), dtype=torch.float32)
    model.generation_config.eos_token_id = end
    model.generation_config.pad_token_id = pad
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
