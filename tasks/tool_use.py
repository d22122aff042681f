"""TL-Training's CPU world: synthetic tool domains, a teacher that makes their trajectories, and the text and
chat template of the tiny base model.

A domain is a tool set whose names share prefixes, as in the paper's Fig. 2 example. `PAPER_SEARCH` is the CPU
task: a query asks for one or two things, one call each; before a call the teacher sometimes makes one of its
mistakes with that tool, which the tool answers with an error (an adverse interaction, which MAE leaves
untrained), then makes the correct call; after the last tool output it answers in text. `TRAVEL` is another domain, only for
pretraining the tiny base model (tasks/tiny_tool_use.py) to know the call format before it sees PAPER_SEARCH.
Conversations are OpenAI-style messages with `tool_calls`, plus the tools as JSON schemas, the format
tl_training.py reads from files.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from common.tools import execute_tool, tool_error


class Tool(NamedTuple):
    """A synthetic tool: its parameters, the templates of the queries it answers, and the teacher's mistakes with
    it, each (kind, detail), kind one of "tool" (a wrong tool name), "drop" (a required parameter left out),
    "rename" (a parameter under a wrong name), "typo" (a letter left out of a value); every one makes the tool
    fail."""

    required: list[str]
    optional: list[str]
    queries: list[str]
    mistakes: list[tuple]


@dataclass(frozen=True)
class Domain:
    """A synthetic tool set. `tools`: name -> Tool; `values`: the values of each parameter, each one token of the
    tiny tokenizer and quoted in the queries (users paste the names and terms they ask about), so that a model
    of a million parameters learns to fill calls within minutes; `source`: the tools' Python implementation,
    run by common.tools.execute_tool in a subprocess like any real tool."""

    tools: dict
    values: dict
    system_prompt: str
    source: str = ""

    def schemas(self) -> list[dict]:
        """The tools as OpenAI function schemas. No descriptions: every prompt token is paid for in every
        forward pass on a CPU, and the names say what the tools do."""
        def kind(p):
            return "integer" if isinstance(self.values[p][0], int) else "string"

        return [{"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {p: {"type": kind(p)} for p in required + optional}, "required": required}}}
            for name, (required, optional, _, _) in self.tools.items()]


PAPERS = ["ToolLLM", "AlphaFold", "ResNet", "BERT", "Chinchilla", "Gopher", "Llama", "Mamba", "Whisper", "Gorilla",
          "Toolformer", "Reflexion", "Voyager", "Orca", "Vicuna", "Alpaca", "Falcon", "Mistral", "Gemma", "Phi"]
AUTHORS = ["Tanaka", "Silva", "Martin", "Ivanov", "Rossi", "Haddad", "Kim", "Garcia", "Weber", "Mensah", "Novak",
           "Lopez", "Khan", "Farouk", "Nair", "Walsh", "Diaz", "Berg", "Singh", "Chen"]

# The CPU task. A wrong tool name, a wrong or missing argument, an unknown paper or author raises in the tool,
# and the executor answers with the error.
PAPER_SEARCH = Domain(
    tools={
        "get_paper_details": Tool(["title"], [],
                                  ['What is "{title}" about?', 'Give me the details of "{title}".',
                                   'When was "{title}" published?'],
                                  [("tool", "get_paper_detail"), ("rename", {"title": "name"}), ("typo", "title")]),
        "get_paper_citations": Tool(["title"], ["limit"],
                                    ['Which papers cite "{title}"?', 'Show {limit} papers that cite "{title}".',
                                     'Who cites "{title}"? List {limit}.'],
                                    [("drop", "title"), ("tool", "get_paper_citation"), ("rename", {"title": "paper"})]),
        "get_papers_by_keywords": Tool(["query"], ["venue"],
                                       ['Find papers on "{query}".', 'Search "{query}" papers from "{venue}".',
                                        'Any "{venue}" work on "{query}"?'],
                                       [("rename", {"query": "keyword"}),  # Fig. 2's sample S2
                                        ("tool", "get_papers_by_keyword"), ("drop", "query")]),
        "get_papers_by_author": Tool(["author"], ["venue"],
                                     ['What has "{author}" published?', 'List papers by "{author}" at "{venue}".',
                                      'What did "{author}" publish in "{venue}"?'],
                                     [("typo", "author"), ("tool", "get_papers_by_authors"),
                                      ("rename", {"author": "name"})]),
    },
    values={
        "title": PAPERS, "limit": list(range(2, 10)), "author": AUTHORS,
        "query": ["robotics", "genomics", "vision", "speech", "translation", "retrieval", "compression", "fairness",
                  "privacy", "planning", "reasoning", "summarization", "parsing", "clustering", "forecasting",
                  "segmentation", "detection", "alignment", "agents", "proteins"],
        "venue": ["ICLR", "NeurIPS", "ICML", "ACL", "EMNLP", "CVPR", "AAAI", "KDD"],
    },
    system_prompt="You are a research assistant with tools.",
    source=f'''
PAPERS = {PAPERS!r}
AUTHORS = {AUTHORS!r}


def _paper(title):
    if title not in PAPERS:
        raise ValueError(f"no paper is titled {{title!r}}")
    return PAPERS.index(title)


def _papers(key, count):
    return [PAPERS[(key * 7 + k * 3) % len(PAPERS)] for k in range(count)]


def get_paper_details(title):
    return {{"title": title, "year": 2015 + _paper(title) % 10}}


def get_paper_citations(title, limit=3):
    return _papers(_paper(title), int(limit))


def get_papers_by_keywords(query, venue=None):
    return _papers(sum(map(ord, query + (venue or ""))), 2)


def get_papers_by_author(author, venue=None):
    if author not in AUTHORS:
        raise ValueError(f"no author is named {{author!r}}")
    return _papers(AUTHORS.index(author) + sum(map(ord, venue or "")), 2)
''',
)

# Another domain, only for pretraining the tiny base model (tasks/tiny_tool_use.py): clean calls, no tool list
# shown.
TRAVEL = Domain(
    tools={
        "get_weather_today": Tool(["city"], [], ['What is the weather in "{city}" today?',
                                                 'Is it raining in "{city}"?', 'How hot is "{city}" right now?'], []),
        "get_weather_forecast": Tool(["city"], ["days"], ['Forecast for "{city}".',
                                                          'Weather in "{city}" for {days} days?',
                                                          'Give me a {days} day forecast for "{city}".'], []),
        "find_flights_to": Tool(["city"], ["airline"], ['Find flights to "{city}".',
                                                        'Any "{airline}" flights to "{city}"?',
                                                        'Book a "{airline}" flight to "{city}".'], []),
        "find_hotels_in": Tool(["city"], ["stars"], ['Find a hotel in "{city}".',
                                                     'I need a {stars} star hotel in "{city}".',
                                                     'Any {stars} star hotels in "{city}"?'], []),
    },
    values={
        "city": ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Rome", "Seoul", "Dakar", "Quito", "Hanoi",
                 "Sydney", "Denver", "Madrid", "Berlin", "Nairobi", "Lagos", "Boston", "Dubai", "Vienna"],
        "days": list(range(2, 10)), "stars": [2, 3, 4, 5],
        "airline": ["Delta", "Emirates", "Lufthansa", "Qantas", "Iberia", "Finnair", "Avianca", "Aeroflot"],
    },
    system_prompt="You are a travel assistant with tools.",
)


@dataclass(frozen=True)
class ToolUseTask:
    """Queries of a domain as a teacher model would have answered them. A query asks for 1 to `max_calls` things,
    each from another tool and answered by one call, in the order asked. Before each call, with probability
    `adverse_rate`, the teacher first makes one of its mistakes with that tool, drawn at random (in PAPER_SEARCH: a
    hallucinated tool name, a missing parameter, a hallucinated parameter, a misspelled value); the tool, run
    through common.tools, answers with an error, and the teacher makes the correct call. With `answers` every
    call is run and the teacher ends with a text answer restating the tools' outputs, as the official
    trajectories end with a `finish` call; without it (the tiny base model's pretraining, whose TRAVEL domain has
    no implementation) a trajectory ends with its last call."""

    domain: Domain = PAPER_SEARCH
    seed: int = 0
    adverse_rate: float = field(kw_only=True)  # tl_training.py's --adverse-rate says why its default is 0.17
    max_calls: int = field(default=2, kw_only=True)
    answers: bool = field(default=True, kw_only=True)

    def query(self, rng: random.Random) -> tuple[str, dict]:
        name = rng.choice(list(self.domain.tools))
        required, optional, templates, _ = self.domain.tools[name]
        template = rng.choice(templates)
        values = {p: rng.choice(v) for p, v in self.domain.values.items()}
        arguments = {p: values[p] for p in required + optional if "{" + p + "}" in template}
        return template.format(**values), {"name": name, "arguments": arguments}

    def requests(self, rng: random.Random) -> list[tuple[str, dict]]:
        """One query's requests, (text, gold call) each, every one for another tool."""
        count = rng.randint(1, self.max_calls) if self.max_calls > 1 else 1
        requests = []
        while len(requests) < count:
            text, gold = self.query(rng)
            if all(gold["name"] != other["name"] for _, other in requests):
                requests.append((text, gold))
        return requests

    def mistake(self, gold: dict, rng: random.Random) -> dict:
        kind, detail = rng.choice(self.domain.tools[gold["name"]].mistakes)
        arguments = dict(gold["arguments"])
        if kind == "tool":
            return {"name": detail, "arguments": arguments}
        if kind == "rename":
            arguments = {detail.get(k, k): v for k, v in arguments.items()}
        elif kind == "drop":
            arguments.pop(detail)
        elif kind == "typo":
            value = arguments[detail]
            cut = rng.randrange(1, len(value))
            arguments[detail] = value[:cut] + value[cut + 1 :]  # a letter left out
        return {"name": gold["name"], "arguments": arguments}

    def conversations(self, n: int, split: str = "train", exclude: set[str] = frozenset()) -> list[dict]:
        """`n` trajectories; "test" ones have no mistakes, and none of their requests is in `exclude` (pass
        the training requests, each row's "requests") or in another test query, so every test request is new."""
        rng = random.Random(f"{self.seed}-{split}")
        plans, seen, draws = [], set(exclude), 0
        while len(plans) < n:
            requests = self.requests(rng)
            draws += 1
            if split == "test" and any(text in seen for text, _ in requests):
                if draws > 1000 * n:
                    raise ValueError(f"fewer than {n} queries of this domain are not in `exclude`; ask for fewer")
                continue
            seen.update(text for text, _ in requests)
            steps = [(gold, self.mistake(gold, rng) if split == "train" and rng.random() < self.adverse_rate else None)
                     for _, gold in requests]
            plans.append((requests, steps))
        calls = [call for _, steps in plans for gold, wrong in steps for call in (gold, wrong)
                 if call is not None and (call is wrong or self.answers)]
        feedback = execute_calls(self.domain.source, calls)
        rows = []
        for k, (requests, steps) in enumerate(plans):
            query = " ".join(text for text, _ in requests)
            messages = [{"role": "system", "content": self.domain.system_prompt}, {"role": "user", "content": query}]
            for gold, wrong in steps:
                if wrong is not None:
                    messages.append(_assistant_call(wrong))
                    messages.append({"role": "tool", "content": feedback[_call_key(wrong)]})
                    if not messages[-1]["content"].startswith(tool_error(wrong["name"], "")):
                        raise RuntimeError(f"the mistaken call {wrong} did not fail: {messages[-1]['content']}")
                messages.append(_assistant_call(gold))
                if self.answers:
                    messages.append({"role": "tool", "content": feedback[_call_key(gold)]})
            if self.answers:
                outputs = [feedback[_call_key(gold)] for gold, _ in steps]
                messages.append({"role": "assistant", "content": "Result: " + " ".join(outputs)})
            rows.append({"id": f"{split}-{k}", "messages": messages, "tools": self.domain.schemas(),
                         "requests": [text for text, _ in requests]})
        return rows


def _assistant_call(call: dict) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]}


def _call_key(call: dict) -> str:
    return json.dumps(call, sort_keys=True)


def execute_calls(source: str, calls: Sequence[dict]) -> dict[str, str]:
    """The tools' output for every distinct call, through the shared tool executor (each call is a
    subprocess, so distinct calls run in parallel threads)."""
    from concurrent.futures import ThreadPoolExecutor

    distinct = {_call_key(c): c for c in calls}
    with ThreadPoolExecutor(max_workers=8) as pool:
        outputs = pool.map(lambda c: execute_tool(source, c["name"], c["arguments"]), distinct.values())
        return dict(zip(distinct, outputs))


def synthetic_data(task: ToolUseTask, train_conversations: int, eval_queries: int) -> tuple[list[dict], list[dict]]:
    """Training trajectories and held-out query conversations of a synthetic task, cached on disk by their
    settings (the tool calls of a fresh set take a while: each is a subprocess)."""
    from common.cache import CACHE_DIR, config_key

    path = CACHE_DIR / f"tool-use-{config_key([dataclasses.asdict(task), train_conversations, eval_queries])}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        return cached["train"], cached["test"]
    train = task.conversations(train_conversations, "train")
    test = task.conversations(eval_queries, "test", exclude={text for c in train for text in c["requests"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"train": train, "test": test}))
    return train, test


# ---- the tiny base model's text ----

# The tiny model's chat template: Qwen2.5's, except that the offered tools are one Python signature each, as
# in the official TL-Training prompts (code/mae/mae.py renders tools as `def name(a: type, b: type = None)`),
# instead of Qwen2.5's 80-token preamble and JSON schemas. Calls, tool responses and everything else are
# Qwen2.5's. The prompt of the CPU task is then about 80 tokens instead of 360, which a model of a million
# parameters processes several times faster; the same `apply_chat_template(tools=...)` path serves both.
SIGNATURES_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.' }}{%- endif %}"
    "{%- if tools %}{{- '\\n# Tools' }}{%- for tool in tools %}"
    "{%- set f = tool.function if tool.function is defined else tool %}"
    "{%- set required = f.parameters.required if f.parameters.required is defined else [] %}"
    "{{- '\\n' + f.name + '(' }}{%- for name, schema in f.parameters.properties.items() %}"
    "{{- name + ': ' + schema.type }}{%- if name not in required %}{{- ' = None' }}{%- endif %}"
    "{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}{{- ')' }}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role in ('user', 'system') or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' + tool_call.arguments | tojson + '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tiny_corpus(domains: Sequence[Domain], per_domain: int = 2000) -> list[str]:
    """Text for the tiny tokenizer's merges: the chat templates' scaffolding and the domains' text, so that
    frequent words become single tokens while tool names stay split at their underscores."""
    from common.models import QWEN25_CHAT_TEMPLATE

    texts = [QWEN25_CHAT_TEMPLATE, SIGNATURES_CHAT_TEMPLATE] * 20
    for domain in domains:
        for tool in domain.schemas():
            properties = tool["function"]["parameters"]["properties"]
            texts += [json.dumps(tool), ", ".join(f"{p}: {v['type']} = None" for p, v in properties.items())] * 20
        single_calls = ToolUseTask(domain, adverse_rate=0.0, max_calls=1, answers=False)
        for conversation in single_calls.conversations(per_domain, "corpus"):
            texts += [m["content"] for m in conversation["messages"]]
            texts += [json.dumps(c["function"]) for m in conversation["messages"] for c in m.get("tool_calls") or []]
    return texts


def copying_drill(domain: Domain, tokenizer) -> Domain:
    """`domain` with every word of `tokenizer`'s vocabulary as the values of its string parameters: each one token
    quoted in a query and in a call, and none a word of either domain's prompts, templates or schemas. With
    hundreds of values a model cannot memorise them and must learn to copy the quoted word into the call (an
    induction-style circuit), which its 20 values per parameter never teach."""
    scaffolding = set()
    for d in (PAPER_SEARCH, TRAVEL):
        texts = [d.system_prompt, SIGNATURES_CHAT_TEMPLATE] + [q for tool in d.tools.values() for q in tool.queries]
        for text in texts + [json.dumps(schema) for schema in d.schemas()]:
            scaffolding |= set(tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"]))

    def one_token(word: str, text: str) -> bool:
        return word in tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])

    words = sorted(w for w in tokenizer.get_vocab() if re.fullmatch(r"[A-Za-z]{3,}", w) and w not in scaffolding
                   and one_token(w, f'Is it "{w}" now?') and one_token(w, json.dumps({"city": w})))
    values = {p: words if isinstance(v[0], str) else v for p, v in domain.values.items()}
    return dataclasses.replace(domain, values=values)


def without_tools(conversations: list[dict]) -> list[dict]:
    """The conversations with no tool list in their prompts (half as long: the base model learns the call format
    and copying, not a tool set)."""
    return [{**c, "tools": []} for c in conversations]
