"""Agent-R: training language-model agents to reflect, by MCTS-built revision trajectories.

Paper: "Agent-R: Training Language Model Agents to Reflect via Iterative Self-Training" (Yuan et al.,
arXiv 2501.11425). Each iteration has two phases (§3, Fig. 2):

    Phase I   MCTS with the current model as policy finds good and bad trajectories of each task;
              the model itself, as a verifier, finds the first bad step t' of a bad trajectory, and the
              revision trajectory is  bad prefix up to t'  +  a revision thought ("Action: wait")  +  the
              good trajectory's continuation.
    Phase II  SFT on revision and good trajectories; the bad prefix is context only (no loss).

The environment is TextCraft (Minecraft crafting in text, as in AgentGym), in pure Python, in
tasks/textcraft.py; the tiny CPU agent is built by tasks/tiny_textcraft.py.

    python agent_r.py                                   # CPU: tiny warm-started model, synthetic recipes
    python agent_r.py --no-revision                     # the baseline: good trajectories only
    python agent_r.py --transition end                  # the Direct-Revision baseline (revise at the end)
    python agent_r.py --resume                          # continue the run in --run-dir
    python agent_r.py --scale paper --recipes PATH      # Llama-3.1-8B-Instruct on the real recipe files

Read top to bottom: Args, the paper's pieces as pure functions, then the loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

import tyro

from tasks.textcraft import (CPU_INSTRUCTION, TEXTCRAFT_INSTRUCTIONS, CraftingRules, Environment, TextCraft,
                             action_text, failed_prefix, react_turn, synthetic_recipes)

# --------------------------------------------------------------------------------------------------
# Args
# --------------------------------------------------------------------------------------------------

# Agent-R's 100 TextCraft test tasks (`mcts_utils/textcraft/textcraft_test.json`): depths 1 to 4.
AGENT_R_TEST_TASKS = (*range(0, 31), *range(140, 181), *range(420, 445), *range(533, 536))


@dataclass
class Args:
    # ---- where things come from and go ----
    scale: Literal["cpu", "paper"] = "cpu"
    """"cpu": the tiny warm-started agent on the synthetic recipes, minutes on a laptop; "paper": Agent-R's
    model and search budget on the real recipe files (then --recipes is required). Applied first; any flag
    given explicitly wins."""
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    """the agent, which is also its own verifier: a hub id, a local directory, or "tiny-textcraft" (the
    warm-started tiny CPU agent shipped in models/tiny-textcraft; see tasks/tiny_textcraft.py). Agent-R §4:
    Llama-3.1-8B-Instruct."""
    recipes: str = "synthetic"
    """TextCraft's recipe folder (AgentGym's agentenv_textcraft/recipes; the shared data folder
    textcraft/recipes holds a copy), or "synthetic" (the small world of the CPU default)."""
    instruction: str | None = None
    """the first user turn of every episode; default: the --textcraft-client's TextCraft instruction, verbatim.
    The CPU default uses one line: a tiny model pays for every prompt token and cannot read the long one."""
    textcraft_client: Literal["2024", "2025"] = "2024"
    """which AgentGym TextCraft client the environment reads actions as (and whose instruction is the default):
    "2024", its first release, which Agent-R ran on (the text after the last "Action:", later lines included, no
    refusal); "2025", its September 2025 update (one "Action:" up to the line end, a turn with two refused)."""
    run_dir: str = "runs/agent_r"
    """metrics.jsonl, samples.jsonl, curves.png, the search trees and trajectories of every iteration, and
    the checkpoints go here."""
    resume: bool = False
    """continue from the last checkpoint in --run-dir (same Args); saved trees and trajectories are reused."""
    report_to: tuple[str, ...] = ()
    """experiment trackers beside metrics.jsonl and the PNG, any of accelerate's: tensorboard, wandb, trackio, mlflow, ...
    (their package installed); e.g. --report-to tensorboard writes under --run-dir."""
    seed: int = 1
    backend: Literal["hf", "vllm"] = "hf"
    """sampler for search, critique and evaluation: transformers `generate` (anywhere) or vLLM (GPU; the
    paper's code uses vLLM)."""
    vllm_gpu_memory_utilization: float = 0.4
    """share of GPU memory vLLM may take; the rest holds the model being trained."""
    tensor_parallel_size: int = 1
    """vLLM engines are groups of this many consecutive processes (tensor parallel; Llama-3.1-8B fits one
    GPU); it must divide the number of processes."""
    vllm_sleep_mode: bool = True
    """vLLM frees its weights and KV cache during Phase II and takes them back, with the new weights, for the
    search and the evaluation (vLLM's sleep mode, level 2; CUDA only)."""
    vllm_max_model_len: int | None = None
    """the longest conversation vLLM serves (its KV cache is reserved for it); None: the model's context. An
    episode of --eval-max-steps turns of --max-new-tokens can grow long, so the default stays the context."""
    dtype: str = "bfloat16"
    """the model's dtype ("float32" on CPU)."""
    gradient_checkpointing: bool = True
    """recompute activations in the backward pass."""

    # ---- tasks ----
    eval_tasks: tuple[int, ...] = AGENT_R_TEST_TASKS
    """held-out goals, as task indices (goals sorted by (depth, item id); index i names goal i mod the number of
    goals): no task naming one of these goals is searched or trained on. Default: Agent-R's 100 TextCraft test
    tasks (Table 1: test size 100), all below 544, so distinct goals. Logged as eval/..."""
    eval_seen_tasks: tuple[int, ...] = ()
    """held-out seeds of training goals: task indices never searched or trained on whose goal is trained on (an
    index past the number of goals shows its goal with another recipe list: order and distractors). Logged as
    eval_seen/...; the paper has none."""
    train_pool: int = 544
    """training tasks are drawn from the indices 0..N-1 that name no held-out goal and are no held-out seed."""

    # ---- Phase I: MCTS (§3.1; official mcts_utils/) ----
    iterations: int = 3
    """rounds of Phase I + Phase II; the model of round i searches and verifies for round i+1 (§3.3: 3)."""
    train_tasks: int = 200
    """tasks searched per round (Table 1, "Simulation #" for TextCraft: 200)."""
    mcts_iterations: int = 8
    """root-to-leaf descents per task (ITERA; the authors, issue #3: "can be 8")."""
    num_generate: int = 4
    """responses sampled per expansion, duplicates removed (N_GEN; not published; mcts_raw default 4)."""
    max_depth: int = 10
    """most actions on a search path; a node at this depth is terminal (MAX_DEPTH; not published;
    mcts_raw default 10. The official check `depth > MAX_DEPTH` allows one action more)."""
    uct_c: float = 0.25
    """UCT exploration constant c (official `coef = 0.25`)."""
    temperature: float = 1.0
    """sampling temperature of expansions (TEMP; the official default 1.0)."""
    max_new_tokens: int = 500
    """longest agent turn (the official vLLM `max_tokens`)."""
    search_batch: int = 200
    """tasks searched together (one batched generation serves all their expansions); their trees are saved
    when the batch is done, so a killed run loses at most one batch."""

    # ---- Phase I: good/bad pairs and model-guided critique (§3.2; official path_collection.py) ----
    alpha: float = 0.5
    """a good trajectory's final reward must exceed alpha ("the lower bound for high-quality trajectories";
    value not published; TextCraft's reward is 0 or 1)."""
    beta: float = 0.2
    """a pair's rewards must differ by more than beta ("the distinguishable gap"; value not published)."""
    pairs_per_task: int | None = None
    """at most this many (good, bad) pairs per task, after the official shuffle; None: all of them, as the
    official code (O(leaves²) per task)."""
    revision: bool = True
    """train on revision trajectories (Agent-R); --no-revision trains on good trajectories only, the
    paper's "optimal trajectories" baseline (Fig. 3)."""
    good_trajectories: bool = True
    """train on good trajectories too (Agent-R and its baseline both do); --no-good-trajectories trains on
    revision trajectories only, a diagnostic that is not in the paper (what the revision data alone teaches)."""
    transition: Literal["model", "end"] = "model"
    """t': the first step the model, as verifier, judges Bad (Agent-R's model-guided critique), or the end
    of the bad trajectory (the Direct-Revision baseline, Table 2)."""
    verifier_temperature: float = 0.0
    """sampling temperature of the verifier (not published; the official code samples at TEMP; greedy makes
    each node's verdict one answer shared by every pair)."""
    verifier_max_new_tokens: int = 500
    """longest verifier answer."""
    revision_thoughts: int = 10
    """the revision turns draw their thought from the first N of the paper's ten (Table 5: all ten; the
    official code reaches ten of its twenty)."""

    # ---- Phase II: SFT (§3.3) ----
    epochs: float = 3.0
    """passes over each round's data (not published; xtuner's llama3_8b_instruct_full_alpaca_e3: 3)."""
    lr: float = 2e-5
    """peak learning rate, AdamW (not published; the xtuner template: 2e-5)."""
    batch_size: int = 16
    """conversations per optimizer step (the xtuner template: 1 × 16 accumulation)."""
    micro_batch_size: int = 1
    """conversations per forward/backward, a batch sorted by length: memory and padding are bounded by it,
    the loss and gradient are the whole batch's (the xtuner template: per-device batch 1)."""
    warmup_ratio: float = 0.03
    """linear warmup over this share of the steps (the xtuner template: 0.03)."""
    general_data: str | None = None
    """general chat data mixed into Phase II: a local .jsonl/.json/.parquet of OpenAI `messages` or
    ShareGPT `conversations` rows (the paper: ShareGPT_Vicuna_unfiltered), or "warm-start" (the tiny CPU
    agent's own general chats, see tasks/tiny_textcraft.py). None: agent data only."""
    eta: float = 0.2
    """general conversations per agent trajectory (the paper: η = 0.2)."""

    # ---- evaluation and logging ----
    eval_max_steps: int = 100
    """most agent turns of a held-out episode (official eval.py `--max_steps`)."""
    eval_temperature: float = 0.0
    """0: greedy. The official eval samples at TEMP (1.0 unless set)."""
    log_samples: int = 2
    """held-out episodes written to samples.jsonl per evaluation."""


def synthetic_eval_tasks() -> tuple[int, ...]:
    """The CPU default's held-out goals: every fourth goal of the synthetic world (11 of 44, depths 1 to 4),
    never searched, demonstrated or trained on."""
    return tuple(range(1, len(CraftingRules(synthetic_recipes()).goals()), 4))


def synthetic_seen_tasks(pool: int = 880) -> tuple[int, ...]:
    """The CPU default's held-out seeds of training goals: every other goal of the synthetic world (none of them
    held out), each with the recipe list of an index past the training pool, so never searched or demonstrated
    itself (a goal with few recipe lines has few orders, so some lists coincide with a trained task's)."""
    held_out = set(synthetic_eval_tasks())
    num_goals = len(CraftingRules(synthetic_recipes()).goals())
    return tuple(pool + goal for goal in range(0, num_goals, 2) if goal not in held_out)


def training_pool(pool_size: int, num_goals: int, held_out_goals: Sequence[int],
                  held_out_seeds: Sequence[int] = ()) -> list[int]:
    """The task indices training draws from: 0..pool_size-1 without any index naming a held-out goal (index i
    names goal i mod num_goals) and without the held-out seeds."""
    goals = {task % num_goals for task in held_out_goals}
    pool = [task for task in range(pool_size) if task % num_goals not in goals and task not in set(held_out_seeds)]
    if not pool:
        raise ValueError(f"--train-pool {pool_size} leaves no training task once the held-out tasks are removed")
    return pool


def scale_preset(scale: str) -> dict:
    """Overrides of the Args defaults for a scale, applied before the command line, which wins over them."""
    if scale == "paper":
        return {}  # the Args defaults are Agent-R's settings (or the official code's where the paper is silent)
    return dict(
        model="tiny-textcraft", recipes="synthetic", instruction=CPU_INSTRUCTION, dtype="float32",
        gradient_checkpointing=False, eval_tasks=synthetic_eval_tasks(), eval_seen_tasks=synthetic_seen_tasks(),
        train_pool=880, train_tasks=16,
        mcts_iterations=4, num_generate=4, max_depth=10, temperature=0.6, max_new_tokens=48, search_batch=16,
        pairs_per_task=8, verifier_max_new_tokens=24, revision_thoughts=1, lr=5e-4, batch_size=16, micro_batch_size=4,
        general_data="warm-start", eval_max_steps=12,
    )


def parse_args(argv: list[str] | None = None) -> Args:
    """--scale, then every explicit flag."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = tyro.cli(Args, args=argv)  # only to read --scale (and to validate argv)
    args = tyro.cli(Args, args=argv, default=dataclasses.replace(Args(), **scale_preset(chosen.scale)))
    if args.scale == "paper" and args.recipes == "synthetic":
        raise ValueError("--scale paper runs on the real TextCraft recipes: pass --recipes with their folder "
                         "(AgentGym's agentenv_textcraft/recipes)")
    if not (args.revision or args.good_trajectories):
        raise ValueError("--no-revision with --no-good-trajectories leaves Phase II nothing to train on; drop one")
    if not 1 <= args.revision_thoughts <= len(REVISION_THOUGHTS):
        raise ValueError(f"--revision-thoughts {args.revision_thoughts}: the paper has {len(REVISION_THOUGHTS)} "
                         f"revision thoughts; pick 1 to {len(REVISION_THOUGHTS)}")
    return args


# --------------------------------------------------------------------------------------------------
# Phase I, trajectory search (§3.1): the search tree, UCT selection, backup
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    """A search-tree node: the state after the agent turn `response` got `observation` from the
    environment. The root is the task's start (its observation is the task description)."""

    response: str = ""  # the model's whole turn, "Thought: ...\nAction: ..."
    observation: str = ""
    reward: float = 0.0  # the environment's reward for this step
    depth: int = 0  # actions from the root
    terminal: bool = False
    visits: int = 0
    value: float = 0.0  # sum of the terminal rewards backed up through this node
    children: list["Node"] = field(default_factory=list)
    parent: "Node | None" = field(default=None, repr=False)

    @property
    def action(self) -> str:
        return action_text(self.response)

    def path(self) -> list["Node"]:
        """The nodes from the root's child down to this node (the root's path is empty)."""
        nodes, node = [], self
        while node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]


def uct_score(value: float, visits: int, parent_visits: int, c: float) -> float:
    """UCT of a child (§3.1; official `MCTSNode.puct`): Q + c·sqrt(ln N_parent / N_child), Q = value/visits;
    an unvisited child scores +inf so that every child is tried once before any is tried twice."""
    if visits == 0:
        return math.inf
    return value / visits + c * math.sqrt(math.log(parent_visits) / visits)


def uct_select(node: Node, c: float, rng: random.Random) -> Node | None:
    """The non-terminal child of `node` with the highest UCT, ties broken at random; None when every
    child is terminal (the subtree is exhausted)."""
    open_children = [child for child in node.children if not child.terminal]
    if not open_children:
        return None
    scores = [uct_score(child.value, child.visits, node.visits, c) for child in open_children]
    best = max(scores)
    return rng.choice([child for child, score in zip(open_children, scores) if score == best])


def descend(node: Node, c: float, rng: random.Random) -> Node | None:
    """Follow UCT from `node` down to a node without children (the next to expand). A node whose
    children are all terminal is marked terminal itself; None when the descent hits one."""
    while node.children:
        child = uct_select(node, c, rng)
        if child is None:
            node.terminal = True
            return None
        node = child
    return node


def backup(node: Node, reward: float) -> None:
    """Add a terminal node's reward to every node up to the root (official `_backpropagate`), marking
    a node terminal once all its children are."""
    while node is not None:
        node.visits += 1
        node.value += reward
        if node.children:
            node.terminal = all(child.terminal for child in node.children)
        node = node.parent


def tree_to_dict(node: Node) -> dict:
    return {"response": node.response, "action": node.action, "observation": node.observation,
            "reward": node.reward, "depth": node.depth, "terminal": node.terminal, "visits": node.visits,
            "value": node.value, "children": [tree_to_dict(child) for child in node.children]}


def tree_from_dict(data: dict, parent: Node | None = None) -> Node:
    node = Node(data["response"], data["observation"], data["reward"], data["depth"], data["terminal"],
                data["visits"], data["value"], parent=parent)
    node.children = [tree_from_dict(child, node) for child in data["children"]]
    return node


def leaf_paths(root: Node) -> list[list[Node]]:
    """Every root-to-leaf path ending at a terminal node (official `find_leaf_paths`), root excluded."""
    if root.terminal and not root.children:
        return [root.path()]
    return [path for child in root.children for path in leaf_paths(child)]


def path_value(path: list[Node]) -> float:
    """A path's value: its leaf's mean backed-up reward, i.e. the final reward (a leaf is backed up once)."""
    leaf = path[-1]
    return leaf.value / leaf.visits if leaf.visits else 0.0


# --------------------------------------------------------------------------------------------------
# Phase I, good/bad pairs and model-guided critique (§3.2)
# --------------------------------------------------------------------------------------------------


def pair_paths(values: Sequence[float], alpha: float, beta: float, seed: int = 123) -> list[tuple[int, int]]:
    """(good, bad) index pairs of leaf paths (§3.2; official `pair_leaf_paths`): the good one is of high
    quality, value > alpha, and better than the bad one by more than the distinguishable gap beta.
    Every such ordered pair, shuffled with the official seed 123."""
    pairs = [(i, j) for i, good in enumerate(values) for j, bad in enumerate(values)
             if i != j and good > alpha and good - bad > beta]
    random.Random(seed).shuffle(pairs)
    return pairs


VERIFIER_PROMPT = (  # Agent-R Table 4, verbatim; {history} holds one "Action: ..." / "Observation: ..." line each
    "You are a good verifier of interactive environments. You will be given a history log that memorizes an agent "
    "interacting with the environment to solve a task. The format of the log is\n###\nAction: Action\n"
    "Observation: Observation\n###\nLog:\nTask Description: {task}\n{history}\nCurrent Action: {action}\n"
    "Current Observation: {observation}\nYou need to verify whether the current action is good or bad or uncertain.\n"
    "- A good action is one that is greatly helpful to solve the task.\n"
    "- A bad action is one that is greatly harmful to solve the task.\n"
    "- An uncertain action is one that is neither good nor bad. You cannot judge based on the current information.\n"
    "You must give reasons first and then give the response with the format: Judgment: <Good or Bad or Uncertain>"
)


def verifier_prompt(task: str, history: Sequence[tuple[str, str]], action: str, observation: str) -> str:
    """The verifier's question about one step of a bad trajectory, given the steps before it as
    (action, observation) pairs (Table 4)."""
    lines = "\n".join(f"Action: {a}\nObservation: {o}" for a, o in history)
    return VERIFIER_PROMPT.format(task=task, history=lines, action=action, observation=observation)


def step_prompt(task: str, path: Sequence[Node], step: int) -> str:
    """The verifier's question about step `step` (0-based) of a bad path (§3.2, Table 4; official
    `revise_worst_path`): the steps before it are the history log, the step itself is the current action and
    observation."""
    return verifier_prompt(task, [(n.action, n.observation) for n in path[:step]], path[step].action,
                           path[step].observation)


def parse_judgment(text: str) -> str | None:
    """"good", "bad" or "uncertain" from the verifier's answer, or None when it gives no label.

    Reads the last "Judgment:" label; the paper spells it "Judgment", the official prompt "Judgement",
    models add bold (**Judgment:** **Bad**). The official parser splits on "Judgement:" only, so a
    "Judgment:" answer, which usually mentions "good" somewhere, silently counted as Good.
    """
    labels = re.findall(r"judge?ment\W*(good|bad|uncertain)", text, re.IGNORECASE)
    return labels[-1].lower() if labels else None


def first_bad_step(judgments: Sequence[str | None]) -> int:
    """t' (0-based): the first step judged "bad"; the last step when none is (the revision then comes at
    the end, as Direct-Revision). Only an explicit Bad stops the walk: a missing label is not a verdict."""
    return next((t for t, judgment in enumerate(judgments) if judgment == "bad"), len(judgments) - 1)


REVISION_THOUGHTS = (  # Agent-R Table 5
    "I realize my approach was flawed. I need to revise it.",
    "I took the wrong actions. I need to identify the right path.",
    "My actions were incorrect. I must adjust my strategy.",
    "I see an error in my actions. I need to fix it.",
    "My judgment was incorrect. I need to rethink it.",
    "I overlooked something important. I need to address it.",
    "I recognize my mistake. Let's find a better solution.",
    "I recognize my failure. I need to learn and move forward.",
    "My decision was wrong. I should reevaluate.",
    "I made an error. I must determine how to correct it.",
)
REVISION_ACTION, REVISION_OBSERVATION = "wait", "ok."


def revision_trajectory(start: Sequence[dict], bad: Sequence[tuple[str, str]], good: Sequence[tuple[str, str]],
                        thought: str) -> list[dict]:
    """The revision trajectory τ^r = [τ^b_{≤t'}, rs, τ^g_{>common prefix}] (§3.2, Fig. 2; official
    `conversation_generation`), as chat messages with a per-message "loss" flag.

    start: the episode's opening messages (instruction, "Ok.", task description), never trained.
    bad:   the bad trajectory's (response, observation) turns up to and including t'; context only.
    good:  the whole good trajectory's turns. The turns it shares with `bad` from the start are skipped;
           the rest follow the revision signal and are trained.
    The revision signal rs is an agent turn "Thought: <thought>\\nAction: wait" (trained) answered by
    "ok." (it is never executed in the environment).
    """
    shared = 0
    for (good_response, _), (bad_response, _) in zip(good, bad):
        if good_response != bad_response:
            break
        shared += 1
    messages = [{k: v for k, v in m.items() if k != "loss"} | {"loss": False} for m in start]
    for response, observation in bad:
        messages += [{"role": "assistant", "content": response, "loss": False},
                     {"role": "user", "content": observation, "loss": False}]
    messages += [{"role": "assistant", "content": react_turn(thought, REVISION_ACTION), "loss": True},
                 {"role": "user", "content": REVISION_OBSERVATION, "loss": False}]
    for response, observation in good[shared:]:
        messages += [{"role": "assistant", "content": response, "loss": True},
                     {"role": "user", "content": observation, "loss": False}]
    return messages


def good_trajectory(start: Sequence[dict], good: Sequence[tuple[str, str]]) -> list[dict]:
    """A good trajectory as training messages: every agent turn trained, the opening never."""
    messages = [{k: v for k, v in m.items() if k != "loss"} | {"loss": False} for m in start]
    for response, observation in good:
        messages += [{"role": "assistant", "content": response, "loss": True},
                     {"role": "user", "content": observation, "loss": False}]
    return messages


def loss_mask(messages: Sequence[dict]) -> list[bool]:
    """Which messages carry loss (§3.3, Eq. 1): the assistant turns flagged "loss". For a revision
    trajectory that is the revision turn and the good continuation, never the bad prefix."""
    return [m["role"] == "assistant" and bool(m.get("loss", False)) for m in messages]


def phase_two_data(agent_data: Sequence[list[dict]], general: Sequence[list[dict]], eta: float,
                   seed: int) -> list[list[dict]]:
    """Phase II's conversations (§3.3; issue #8): every agent trajectory, and general chats at η per agent
    trajectory, round(η·|agent data|) of them drawn without replacement (all of them when there are fewer)."""
    count = min(len(general), round(eta * len(agent_data)))
    return list(agent_data) + random.Random(seed).sample(list(general), count)


def training_example(tokenizer, messages: Sequence[dict]) -> dict:
    """Token ids and labels of a flagged conversation through the chat template: tokens of untrained
    messages (bad prefix, observations, opening) are labelled -100."""
    from common.sft import tokenize_chat

    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    tokens = tokenize_chat(tokenizer, plain, loss_mask(messages))
    return {"input_ids": tokens.input_ids, "labels": tokens.labels}


# --------------------------------------------------------------------------------------------------
# Plumbing: the model as agent and verifier, episodes, the batched search and critique
# --------------------------------------------------------------------------------------------------


class Agent:
    """The current model in its two roles: the policy (next turn of an episode) and the verifier.
    Requests are batched across tasks; the sampler is transformers `generate` or vLLM."""

    def __init__(self, sampler, max_new_tokens: int, verifier_max_new_tokens: int):
        self.sampler = sampler
        self.max_new_tokens, self.verifier_max_new_tokens = max_new_tokens, verifier_max_new_tokens

    def act(self, conversations: Sequence[list[dict]], n: int, temperature: float, seed: int) -> list[list[str]]:
        """`n` sampled next turns for each conversation."""
        if not conversations:
            return []
        samples = self.sampler.generate(list(conversations), n=n, max_new_tokens=self.max_new_tokens,
                                        temperature=temperature, top_p=1.0, seed=seed)
        return [[s.text.strip() for s in samples[i * n:(i + 1) * n]] for i in range(len(conversations))]

    def verify(self, prompts: Sequence[str], temperature: float, seed: int) -> list[str]:
        """The verifier's answers, one per prompt, each asked as a single user turn (official `revise_worst_path`)."""
        if not prompts:
            return []
        samples = self.sampler.generate([[{"role": "user", "content": p}] for p in prompts], n=1,
                                        max_new_tokens=self.verifier_max_new_tokens, temperature=temperature,
                                        top_p=1.0, seed=seed)
        return [s.text.strip() for s in samples]


FIRST_REPLY = "Ok."  # Agent-R's `setup_conversation`


def opening(env: Environment, task_index: int) -> list[dict]:
    """An episode's first messages (official `setup_conversation`): instruction, "Ok.", task description."""
    return [{"role": "user", "content": env.instruction}, {"role": "assistant", "content": FIRST_REPLY},
            {"role": "user", "content": env.reset(task_index)}]


def conversation(start: list[dict], turns: Sequence[tuple[str, str]]) -> list[dict]:
    messages = list(start)
    for response, observation in turns:
        messages += [{"role": "assistant", "content": response}, {"role": "user", "content": observation}]
    return messages


def act_in(env: Environment, response: str) -> tuple[str, float, bool]:
    """One agent turn in `env`. A revision turn (`Action: wait`) is answered "ok." and not executed, as in the
    revision trajectories the model is trained on. (The official harness sends it to the environment, where
    TextCraft answers "Could not execute wait": an error observation, never seen after a revision turn in
    training, after which the tiny CPU agent revises again and again.)"""
    if action_text(response) == REVISION_ACTION:
        return REVISION_OBSERVATION, 0.0, False
    return env.step(response)


@dataclass
class Episode:
    task: int
    start: list[dict]
    turns: list[tuple[str, str]] = field(default_factory=list)  # (response, observation), forced prefix included
    forced: int = 0  # how many of `turns` were given, not generated (the revision test)
    reward: float = 0.0
    done: bool = False


def run_episodes(agent: Agent, make_env, tasks: Sequence[int], max_steps: int, temperature: float, seed: int,
                 prefixes: Sequence[Sequence[str]] | None = None) -> list[Episode]:
    """Play each task until done or `max_steps` generated turns, all tasks in one batch per step.

    With `prefixes`, each episode first executes the given responses (a failed prefix) and the model
    continues from there (official `perform_test_revise`).
    """
    envs, episodes = [], []
    for i, task in enumerate(tasks):
        env = make_env()
        episode = Episode(task, opening(env, task))
        for response in (prefixes[i] if prefixes else []):
            observation, episode.reward, episode.done = act_in(env, response)
            episode.turns.append((response, observation))
        episode.forced = len(episode.turns)
        envs.append(env)
        episodes.append(episode)
    for step in range(max_steps):
        active = [i for i, e in enumerate(episodes) if not e.done]
        responses = agent.act([conversation(episodes[i].start, episodes[i].turns) for i in active], 1, temperature,
                              seed + step)
        for i, (response,) in zip(active, responses):
            observation, episodes[i].reward, episodes[i].done = act_in(envs[i], response)
            episodes[i].turns.append((response, observation))
    return episodes


def repeated_actions(turns: Sequence[tuple[str, str]]) -> int:
    """Steps that repeat the previous step's action and get the same observation: the agent is stuck in a
    loop (Fig. 4). An action that legitimately repeats (crafting the same item twice) also counts; the
    synthetic recipes never need one."""
    steps = [(action_text(response), observation) for response, observation in turns]
    return sum(1 for before, now in zip(steps, steps[1:]) if before == now)


def replay(make_env, task: int, responses: Sequence[str]):
    """A fresh environment at the state after `responses` (the environment is not snapshotted; official MCTS
    replays every action of a node from `reset`)."""
    env = make_env()
    env.reset(task)
    for response in responses:
        act_in(env, response)
    return env


def expand(nodes: Sequence[Node], tasks: Sequence[int], starts: Sequence[list[dict]], agent: Agent, make_env,
           num_generate: int, max_depth: int, temperature: float, seed: int) -> None:
    """Expansion (§3.1; official `expand`): sample `num_generate` next turns for each node, drop duplicate
    responses, execute each in the environment (a revision turn: see `act_in`); a child is terminal when the
    environment says done or the path reaches `max_depth` actions; a terminal child's reward is backed up at once."""
    histories = [[(n.response, n.observation) for n in node.path()] for node in nodes]
    samples = agent.act([conversation(start, turns) for start, turns in zip(starts, histories)], num_generate,
                        temperature, seed)
    for node, task, turns, responses in zip(nodes, tasks, histories, samples):
        for response in dict.fromkeys(responses):  # deduplicated, first-sampled order
            env = replay(make_env, task, [r for r, _ in turns])
            observation, reward, done = act_in(env, response)
            depth = node.depth + 1
            node.children.append(Node(response, observation, reward, depth, done or depth >= max_depth, parent=node))
        for child in node.children:
            if child.terminal:
                backup(child, child.reward)


def advance_descents(cursors: dict[int, Node], c: float, rng: random.Random) -> dict[int, Node]:
    """One wave's step down (§3.1; official `ExtendedMCTS.search`): each descent continues by UCT from the
    node it has just expanded, not from the root, to the next node to expand; a descent that reaches a
    terminal node (or an exhausted subtree) is over and leaves the dict."""
    return {i: leaf for i, node in cursors.items()
            if (leaf := descend(node, c, rng)) is not None and not leaf.terminal}


def search(roots: Sequence[Node], tasks: Sequence[int], starts: Sequence[list[dict]], agent: Agent, make_env,
           iterations: int, num_generate: int, max_depth: int, c: float, temperature: float, seed: int) -> None:
    """MCTS on several tasks at once (§3.1; official `ExtendedMCTS.search`). Each iteration descends from
    the root by UCT, expanding every node it reaches, until it hits a terminal node; the descents of all
    tasks advance together, so one batched generation serves every task's expansion."""
    rng = random.Random(seed)
    for iteration in range(iterations):
        cursors = [i for i, root in enumerate(roots) if not root.terminal]
        current = {i: roots[i] for i in cursors}
        wave = 0
        while current:
            to_expand = [i for i, node in current.items() if not node.children]
            expand([current[i] for i in to_expand], [tasks[i] for i in to_expand], [starts[i] for i in to_expand],
                   agent, make_env, num_generate, max_depth, temperature, seed + 7919 * iteration + wave)
            wave += 1
            current = advance_descents(current, c, rng)


class StepVerdict(NamedTuple):
    """The verifier on one step of a bad path: its whole answer and the judgment read from it."""

    answer: str
    judgment: str | None


def critique_and_splice(roots: Sequence[Node], tasks: Sequence[int], starts: Sequence[list[dict]], agent: Agent,
                        alpha: float, beta: float, pairs_per_task: int | None, transition: str,
                        verifier_temperature: float, seed: int,
                        thoughts: Sequence[str] = REVISION_THOUGHTS) -> tuple[list[dict], list[dict]]:
    """Phase I's data (§3.2; official `path_collection.py`): revision trajectories from (good, bad) pairs
    and good trajectories, as JSON records.

    For every bad path of a pair the verifier walks its steps in order and stops at the first one it
    judges Bad (t'); all walks advance together and each node is judged once, however many pairs share
    it. With transition "end" there is no walk: t' is the last step (Direct-Revision).
    """
    rng = random.Random(seed)
    chosen = []  # (task position, good path, bad path)
    good_records = []
    for k, root in enumerate(roots):
        paths = leaf_paths(root)
        values = [path_value(p) for p in paths]
        pairs = pair_paths(values, alpha, beta)[:pairs_per_task]
        chosen += [(k, paths[i], paths[j]) for i, j in pairs]
        for path, value in zip(paths, values):
            if value > alpha:
                turns = [(n.response, n.observation) for n in path]
                good_records.append({"task": tasks[k], "reward": value, "messages": good_trajectory(starts[k], turns)})

    verdicts: dict[Node, StepVerdict] = {}
    if transition == "model":
        walks = {id(bad): (k, bad) for k, _, bad in chosen}.values()
        pending, step = list(walks), 0
        while pending:
            asked = list({id(bad[step]): (k, bad) for k, bad in pending if bad[step] not in verdicts}.values())
            prompts = [step_prompt(starts[k][2]["content"], bad, step) for k, bad in asked]
            for (k, bad), answer in zip(asked, agent.verify(prompts, verifier_temperature, seed + step)):
                verdicts[bad[step]] = StepVerdict(answer, parse_judgment(answer))
            pending = [(k, bad) for k, bad in pending if verdicts[bad[step]].judgment != "bad" and step + 1 < len(bad)]
            step += 1

    revision_records = []
    for k, good, bad in chosen:
        walked = [verdicts[n] for n in bad if n in verdicts]  # empty with transition "end"
        revision_records.append({"task": tasks[k]} | splice_pair(starts[k], good, bad, walked, rng.choice(thoughts)))
    return revision_records, good_records


def splice_pair(start: Sequence[dict], good: Sequence[Node], bad: Sequence[Node], walked: Sequence[StepVerdict],
                thought: str) -> dict:
    """One (good, bad) pair's revision trajectory (§3.2, Fig. 2): t' is the first step of the verifier's walk
    judged Bad, or the bad path's last step when none is or nothing was walked (Direct-Revision); the bad
    prefix keeps t' itself, and `revision_trajectory` continues with the good path. `walked`: the verdicts on
    the bad path's steps in order, as far as the verifier was asked."""
    walked = list(walked[: first_bad_step([v.judgment for v in walked]) + 1])
    t_prime = first_bad_step([v.judgment for v in walked]) if walked else len(bad) - 1
    messages = revision_trajectory(start, [(n.response, n.observation) for n in bad[: t_prime + 1]],
                                   [(n.response, n.observation) for n in good], thought)
    shared = next((k for k, (g, b) in enumerate(zip(good, bad)) if g.response != b.response), min(len(good), len(bad)))
    first_error = next((k + 1 for k, n in enumerate(bad) if TextCraft.is_error(n.observation)), None)
    return {"messages": messages, "first_bad_step": t_prime + 1, "bad_length": len(bad),
            "detected": any(v.judgment == "bad" for v in walked), "shared_steps": shared,
            "first_error_step": first_error,
            "verifier": [{"action": n.action, "observation": n.observation, "answer": v.answer, "judgment": v.judgment}
                         for n, v in zip(bad, walked)]}


TRANSITION_PLACEMENTS = ("shared", "before_error", "at_error", "after_error", "no_error")


def transition_placement(first_bad_step: int, shared_steps: int, first_error_step: int | None) -> str:
    """Where t' falls on its bad path (steps counted from 1, as `first_bad_step`): "shared" when it is a step
    the good path also took (t' <= `shared_steps`), a step that led to success, so the revision turn is
    trained after a step that was fine; otherwise relative to the bad path's first error observation ("Could
    not ..."): "before_error", "at_error", "after_error", or "no_error" when the bad path met none (it failed
    by running out of steps without a refusal)."""
    if first_bad_step <= shared_steps:
        return "shared"
    if first_error_step is None:
        return "no_error"
    if first_bad_step < first_error_step:
        return "before_error"
    return "at_error" if first_bad_step == first_error_step else "after_error"


def transition_counts(revision_records: Sequence[dict]) -> list[int]:
    """How many revision trajectories have their t' at each of `TRANSITION_PLACEMENTS`."""
    placements = [transition_placement(r["first_bad_step"], r["shared_steps"], r["first_error_step"])
                  for r in revision_records]
    return [placements.count(p) for p in TRANSITION_PLACEMENTS]


TOKEN_KINDS = ("revision_turn", "after_revision", "good", "general")


def trained_token_counts(tokenizer, agent_conversations: Sequence[list[dict]],
                         general_conversations: Sequence[list[dict]]) -> dict[str, int]:
    """Phase II's trained tokens by kind: the revision turns ("revision_turn"), the good continuations that
    follow them in revision trajectories ("after_revision"), the agent turns of good trajectories ("good"), and
    the general chats' assistant turns ("general"). Counted as the SFT labels them (end-of-turn tokens included)."""
    from common.sft import IGNORE_INDEX, tokenize_chat

    counts = dict.fromkeys(TOKEN_KINDS, 0)
    for general, conversations in ((False, agent_conversations), (True, general_conversations)):
        for messages in conversations:
            plain = [{"role": m["role"], "content": m["content"]} for m in messages]
            tokens = tokenize_chat(tokenizer, plain, loss_mask(messages))
            revised = False
            for message, trained, (start, end) in zip(messages, loss_mask(messages), tokens.message_spans):
                if not trained:
                    continue
                is_revision = not general and action_text(message["content"]) == REVISION_ACTION
                kind = ("general" if general else "revision_turn" if is_revision
                        else "after_revision" if revised else "good")
                revised = revised or is_revision
                counts[kind] += sum(1 for (a, b), label in zip(tokens.offsets, tokens.labels)
                                    if label != IGNORE_INDEX and start <= a and b <= end and b > a)
    return counts


AFTER_REVISION = ("revision", "error", "repeat", "progress", "end")


def after_revision(turns: Sequence[tuple[str, str]], first: int = 0) -> list[str]:
    """What the agent does in the turn after each of its revision turns (`Action: wait`) from turn `first` on
    (the turns before it are a forced prefix): "revision" (it revises again), "error" (its next action is
    refused), "repeat" (it retries the action it took just before revising), "progress" (another accepted
    action), or "end" (the episode ends on the revision turn)."""
    kinds = []
    for k in range(first, len(turns)):
        if action_text(turns[k][0]) != REVISION_ACTION:
            continue
        if k + 1 == len(turns):
            kinds.append("end")
            continue
        response, observation = turns[k + 1]
        before = next((action_text(r) for r, _ in reversed(turns[:k]) if action_text(r) != REVISION_ACTION), None)
        kinds.append("revision" if action_text(response) == REVISION_ACTION else
                     "error" if TextCraft.is_error(observation) else
                     "repeat" if action_text(response) == before else "progress")
    return kinds


def revision_thought_leaks(turns: Sequence[tuple[str, str]], thoughts: Sequence[str] = REVISION_THOUGHTS) -> tuple[int, int]:
    """(ordinary turns whose thought holds a sentence of a revision thought, ordinary turns): a revision turn's words
    carried into turns that act (e.g. "Thought: I need to revise it.\nAction: get 2 bone"), where the agent has
    learnt the revision thought as a thought of any turn rather than as the signal of a revision turn."""
    sentences = {sentence.strip() + "." for thought in thoughts for sentence in thought.split(".") if sentence.strip()}
    ordinary = [response for response, _ in turns if action_text(response) != REVISION_ACTION]
    return sum(any(sentence in response.split("Action:")[0] for sentence in sentences) for response in ordinary), len(ordinary)


def revision_logprob(model, tokenizer, conversations: Sequence[list[dict]], thoughts: Sequence[str],
                     batch_size: int = 16) -> list[float]:
    """log P(the next agent turn is a revision turn | conversation), for each conversation: the log of the
    summed probability of "Thought: <thought>\nAction: wait" over the revision thoughts in use, end of turn
    included. Greedy decoding shows a revision turn only once it is the likeliest turn; this shows how far
    Phase II has moved the model toward one (the paper's revision test, Table 3, counts only the outcome)."""
    import torch

    from common.distributed import largest
    from common.sampling import Sample, collate, response_logprobs
    from common.sft import IGNORE_INDEX, tokenize_chat

    samples = []  # one per (conversation, thought): the context as prompt, the revision turn as response
    for messages in conversations:
        for thought in thoughts:
            chat = [*messages, {"role": "assistant", "content": react_turn(thought, REVISION_ACTION)}]
            tokens = tokenize_chat(tokenizer, chat, [False] * len(messages) + [True])
            trained = [i for i, label in enumerate(tokens.labels) if label != IGNORE_INDEX]
            samples.append(Sample(0, tokens.input_ids[:trained[0]], tokens.input_ids[trained[0]:trained[-1] + 1],
                                  "", "stop"))
    device = next(model.parameters()).device
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    turn_logprobs = []
    with torch.no_grad():
        # as many forward passes on every process (under FSDP2 each is a collective); a process with fewer
        # states repeats its first batch, or a one-token stand-in, and drops the result
        stand_in = batches[0] if batches else [Sample(0, [tokenizer.pad_token_id or 0], [tokenizer.pad_token_id or 0], "", "stop")]
        for i in range(largest(len(batches))):
            batch = collate(batches[i] if i < len(batches) else stand_in, tokenizer.pad_token_id or 0).to(device)
            logprobs = (response_logprobs(model, batch) * batch.response_mask).sum(-1).tolist()
            turn_logprobs += logprobs if i < len(batches) else []
    if not conversations:
        return []
    per_state = torch.tensor(turn_logprobs).view(len(conversations), len(thoughts))
    return torch.logsumexp(per_state, dim=-1).tolist()


def first_error_state(episode: "Episode") -> list[dict] | None:
    """The conversation up to the episode's first error observation (where a reflective agent revises), or None."""
    for k, (_, observation) in enumerate(episode.turns):
        if TextCraft.is_error(observation):
            return conversation(episode.start, episode.turns[: k + 1])
    return None


def evaluate(agent: Agent, make_env, tasks: Sequence[int], max_steps: int, temperature: float,
             seed: int, model, tokenizer, thoughts: Sequence[str]) -> tuple[dict, list[dict]]:
    """Held-out metrics: success rate (Table 2), recovery from a forced failed prefix (the revision
    test, Table 3), how likely a revision turn is at the first error of that test, repeated-action loops
    (Fig. 4); and a few episodes as text. On several processes each plays its share of the tasks and the
    metrics are over every process's episodes."""
    from common.distributed import sum_over_ranks

    episodes = run_episodes(agent, make_env, tasks, max_steps, temperature, seed)
    # the same failed prefix for a task in every evaluation and every run
    prefixes = [failed_prefix(make_env(), task, random.Random(task)) for task in tasks]
    recoveries = run_episodes(agent, make_env, tasks, max_steps, temperature, seed, prefixes=prefixes)
    error_states = [state for e in recoveries if (state := first_error_state(e)) is not None]
    revision = revision_logprob(model, tokenizer, error_states, thoughts)
    leaks = [revision_thought_leaks(e.turns[e.forced:], thoughts) for e in episodes + recoveries]
    totals = sum_over_ranks([
        len(tasks), sum(e.reward for e in episodes), sum(len(e.turns) for e in episodes),
        sum(repeated_actions(e.turns) for e in episodes), sum(repeated_actions(e.turns) >= 2 for e in episodes),
        sum(e.reward for e in recoveries),
        sum(any(action_text(r) == REVISION_ACTION for r, _ in e.turns[e.forced:]) for e in recoveries),
        sum(revision), len(revision),
        *[sum(after_revision(e.turns, e.forced).count(kind) for e in episodes + recoveries) for kind in AFTER_REVISION],
        sum(leaked for leaked, _ in leaks), sum(ordinary for _, ordinary in leaks)])
    n, success, steps, repeats, loops, recovered, revised, revision_sum, revision_count = totals[:9]
    followed = dict(zip(AFTER_REVISION, totals[9:14]))
    leaked, ordinary = totals[14:]
    metrics = {
        "eval/success_rate": success / n,
        "eval/steps_mean": steps / n,
        "eval/repeated_actions": repeats / n,
        "eval/loop_share": loops / n,
        "eval/recovery_rate": recovered / n,
        "eval/recovery_revision_turns": revised / n,
        "eval/revision_logprob": revision_sum / revision_count if revision_count else float("nan"),
        "eval/revision_turns": sum(followed.values()) / (2 * n),
        "eval/revision_thought_leaks": leaked / max(1, ordinary),
    } | {f"eval/after_revision_{kind}": count / max(1, sum(followed.values())) for kind, count in followed.items()}
    samples = [{"kind": kind, "task": e.task, "goal": e.start[2]["content"].rsplit("\n", 1)[-1], "reward": e.reward,
                "forced": e.forced, "turns": [f"{r} -> {o}" for r, o in e.turns]}
               for kind, group in (("episode", episodes), ("recovery", recoveries)) for e in group[:1]]
    return metrics, samples


# --------------------------------------------------------------------------------------------------
# Training: iterations of Phase I (search, critique) and Phase II (SFT)
# --------------------------------------------------------------------------------------------------


def resolve_model(args: Args) -> str:
    """A hub id or a directory as given. "tiny-textcraft": the tiny agent shipped in models/, made for the CPU
    default's world and held-out tasks; for another world or held-out split, one made for it and cached."""
    if args.model != "tiny-textcraft":
        return args.model
    from common.cache import CACHE_DIR, shipped_model
    from tasks.tiny_textcraft import WarmStart, warm_start  # its builder imports this file

    # only held-out seeds inside the pool change the demonstrations (and so the build)
    config = WarmStart(recipes=args.recipes, instruction=args.instruction or TEXTCRAFT_INSTRUCTIONS[args.textcraft_client],
                       held_out=args.eval_tasks,
                       held_out_seeds=tuple(task for task in args.eval_seen_tasks if task < args.train_pool),
                       train_pool=args.train_pool)
    shipped = WarmStart()
    # held-out tasks that are a subset of the shipped agent's held-out sets were never trained on either
    if (dataclasses.replace(config, held_out=shipped.held_out, held_out_seeds=shipped.held_out_seeds) == shipped
            and set(config.held_out) <= set(shipped.held_out) and set(config.held_out_seeds) <= set(shipped.held_out_seeds)):
        return shipped_model("tiny-textcraft")
    return str(warm_start(config, CACHE_DIR / f"tiny-textcraft-{config.key()}"))


def resolve_general_data(args: Args, model_path: str) -> str | None:
    if args.general_data == "warm-start":
        if args.model != "tiny-textcraft":
            raise ValueError("--general-data warm-start means the tiny agent's own general chats; it needs "
                             "--model tiny-textcraft. Pass a chat file (e.g. ShareGPT as .jsonl) instead.")
        return str(Path(model_path) / "general.jsonl")
    return args.general_data


def load_general_chats(source: str) -> list[list[dict]]:
    """General chat conversations from a local file or hub id: OpenAI `messages` rows or ShareGPT
    `conversations` rows (ShareGPT_Vicuna_unfiltered, the paper's general data)."""
    from common.data import DataError, load_rows

    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    chats = []
    for index, row in enumerate(load_rows(source)):
        if isinstance(row.get("messages"), list):
            chat = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        elif isinstance(row.get("conversations"), list):
            chat = [{"role": roles.get(m.get("from"), ""), "content": m.get("value") or ""}
                    for m in row["conversations"]]
        else:
            raise DataError(f"{source}: row {index} has neither 'messages' nor 'conversations' "
                            f"(its fields: {sorted(row)})")
        if any(m["role"] not in roles.values() for m in chat):
            raise DataError(f"{source}: row {index} has a turn whose role is not user/assistant/system")
        if any(m["role"] == "assistant" for m in chat):
            chats.append([m | {"loss": m["role"] == "assistant"} for m in chat])
    if not chats:
        raise DataError(f"{source}: no conversation with an assistant turn")
    return chats


def search_trees(tasks: Sequence[int], make_env, agent: Agent, args: Args, tree_dir: Path,
                 seed: int) -> tuple[list[Node], list[list[dict]]]:
    """Phase I search for `tasks`, `args.search_batch` tasks at a time; each tree is saved as JSON as soon
    as its batch is done, and a saved tree is loaded instead of searched again (resume)."""
    from tqdm.auto import tqdm

    env = make_env()
    starts = [opening(env, task) for task in tasks]
    roots: list[Node | None] = []
    for task, start in zip(tasks, starts):
        path = tree_dir / f"task-{task:05d}.json"
        roots.append(tree_from_dict(json.loads(path.read_text())["tree"]) if path.is_file() else None)
    missing = [k for k, root in enumerate(roots) if root is None]
    tree_dir.mkdir(parents=True, exist_ok=True)
    for first in tqdm(range(0, len(missing), args.search_batch), desc="mcts", leave=False):
        batch = missing[first:first + args.search_batch]
        for k in batch:
            roots[k] = Node(observation=starts[k][2]["content"])
        search([roots[k] for k in batch], [tasks[k] for k in batch], [starts[k] for k in batch], agent, make_env,
               args.mcts_iterations, args.num_generate, args.max_depth, args.uct_c, args.temperature, seed + first)
        for k in batch:
            record = {"task": tasks[k], "opening": starts[k], "tree": tree_to_dict(roots[k])}
            (tree_dir / f"task-{tasks[k]:05d}.json").write_text(json.dumps(record))
    return roots, starts


def train(args: Args) -> Path:
    import time

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from common.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from common.distributed import gather_lists, shard, sum_over_ranks
    from common.models import load_policy
    from common.sampling import HFSampler, VLLMSampler
    from common.sft import sft_train
    from common.tracking import RunLog, experiment_trackers

    run_dir = Path(args.run_dir)
    accelerator = Accelerator(log_with=experiment_trackers(args.report_to), project_dir=run_dir)
    set_seed(args.seed)
    checkpoint = latest_checkpoint(run_dir) if args.resume else None
    if args.resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}; run once without --resume first")

    env = TextCraft.from_source(args.recipes, args.instruction, args.textcraft_client)
    make_env = lambda: TextCraft(env.rules, env.instruction, client=env.client)  # noqa: E731
    pool = training_pool(args.train_pool, env.num_tasks(), args.eval_tasks, args.eval_seen_tasks)

    model_path = resolve_model(args)
    model, tokenizer = load_policy(model_path, args.dtype, args.gradient_checkpointing)
    # one AdamW for the whole run, started afresh by every Phase II (`sft_train`); FSDP2 prepares a model only
    # with its optimizer
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=args.lr))
    done_iterations = 0
    if checkpoint is not None:
        done_iterations = load_checkpoint(accelerator, checkpoint)["step"]
        accelerator.print(f"resumed from {checkpoint} after iteration {done_iterations}")
    if args.backend == "vllm":
        sampler = VLLMSampler(model_path, tokenizer, tensor_parallel_size=args.tensor_parallel_size,
                              gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                              max_model_len=args.vllm_max_model_len, enable_sleep_mode=args.vllm_sleep_mode,
                              dtype=args.dtype)
    else:
        sampler = HFSampler(model, tokenizer)
    agent = Agent(sampler, args.max_new_tokens, args.verifier_max_new_tokens)
    general_data = resolve_general_data(args, model_path)
    general = load_general_chats(general_data) if general_data else []
    log = RunLog(run_dir, resume_step=done_iterations if checkpoint else None, accelerator=accelerator,
                 project="agent_r", config=args)
    plotted = ["eval/success_rate", "eval_seen/success_rate", "eval/recovery_rate", "eval_seen/recovery_rate", "data/first_bad_step", "eval/repeated_actions",
               "eval/loop_share", "eval/recovery_revision_turns", "eval/revision_logprob", "search/success_share",
               "data/detected_share", "data/transition_shared", "data/tokens_revision_turn", "data/revision_trajectories", "data/good_trajectories", "sft/loss_last",
               "time/iteration_s"]
    title = f"Agent-R ({'revision' if args.revision else 'good only'}, t' = {args.transition}, {args.scale} scale)"

    def held_out(iteration: int) -> dict:
        """The held-out evaluations (held-out goals as eval/..., held-out seeds of training goals as
        eval_seen/...), every process playing its share of the tasks with the current weights."""
        metrics = {}
        for prefix, tasks in (("eval", args.eval_tasks), ("eval_seen", args.eval_seen_tasks)):
            if not tasks:
                continue
            with sampler.serving(model):
                found, samples = evaluate(agent, make_env, shard(tasks), args.eval_max_steps, args.eval_temperature,
                                          args.seed + 1000 * iteration, model, tokenizer,
                                          REVISION_THOUGHTS[: args.revision_thoughts])
            metrics |= {key.replace("eval/", f"{prefix}/", 1): value for key, value in found.items()}
            log.samples(iteration, [row | {"set": prefix} for row in samples[: args.log_samples]])
        return metrics

    if done_iterations == 0:
        log.metrics(0, held_out(0))
        log.plot(plotted, title=title)
    for iteration in range(done_iterations + 1, args.iterations + 1):
        started = time.perf_counter()
        iteration_dir = run_dir / f"iteration-{iteration}"
        seed = args.seed * 1_000_003 + iteration
        tasks = sorted(random.Random(seed).sample(pool, min(args.train_tasks, len(pool))))

        # ---- Phase I.1: MCTS with the current model as policy (§3.1), each process on its share of the tasks ----
        mine = shard(tasks)
        data_path = iteration_dir / "trajectories.json"
        accelerator.wait_for_everyone()  # every process decides from the same files whether Phase I is done
        searched = data_path.is_file()
        with sampler.serving(model):
            roots, starts = search_trees(mine, make_env, agent, args, iteration_dir / "trees", seed)
            search_time = time.perf_counter() - started

            # ---- Phase I.2: good/bad pairs, the model as verifier finds t', revision trajectories (§3.2) ----
            if not searched:
                revision, good = critique_and_splice(roots, mine, starts, agent, args.alpha, args.beta,
                                                     args.pairs_per_task, args.transition, args.verifier_temperature,
                                                     seed, REVISION_THOUGHTS[: args.revision_thoughts])
        if searched:
            data = json.loads(data_path.read_text())
        else:
            data = {"revision": gather_lists(revision), "good": gather_lists(good)}
            if accelerator.is_main_process:
                data_path.write_text(json.dumps(data))

        # ---- Phase II: SFT on revision + good trajectories (+ general chats at η), bad prefixes masked (§3.3) ----
        agent_data = (data["revision"] if args.revision else []) + (data["good"] if args.good_trajectories else [])
        if not agent_data:
            raise RuntimeError(f"iteration {iteration}: the search found no successful trajectory on {len(tasks)} "
                               f"tasks, so there is nothing to train on; raise --mcts-iterations or --num-generate")
        mixed = phase_two_data([r["messages"] for r in agent_data], general, args.eta, seed)
        examples = [training_example(tokenizer, m) for m in mixed]
        tokens = trained_token_counts(tokenizer, mixed[: len(agent_data)], mixed[len(agent_data):])
        steps = max(1, math.ceil(args.epochs * len(examples) / args.batch_size))
        try:
            losses = sft_train(model, examples, steps, args.batch_size, args.lr,
                               warmup_steps=math.ceil(args.warmup_ratio * steps), seed=seed,
                               micro_batch_size=args.micro_batch_size, progress=accelerator.is_main_process,
                               accelerator=accelerator, optimizer=optimizer)
        except FloatingPointError as error:
            raise FloatingPointError(
                f"iteration {iteration}: {error}. The search data of this iteration is saved in {iteration_dir} and "
                f"the last checkpoint ({checkpoint or 'none yet'}) is intact: lower --lr and continue with --resume."
            ) from error

        # ---- evaluation on held-out tasks, then the checkpoint that ends the iteration ----
        paths = [leaf for root in roots for leaf in leaf_paths(root)]
        leaves, successes, solved = sum_over_ranks([len(paths), sum(path_value(p) > args.alpha for p in paths),
                                                    sum(root.value > 0 for root in roots)])
        revision = data["revision"]
        metrics = held_out(iteration) | {
            "search/leaves": leaves,
            "search/success_share": successes / max(1, leaves),
            "search/tasks_solved": solved / len(tasks),
            "data/revision_trajectories": len(revision),
            "data/good_trajectories": len(data["good"]),
            "data/first_bad_step": sum(r["first_bad_step"] for r in revision) / max(1, len(revision)),
            "data/bad_length": sum(r["bad_length"] for r in revision) / max(1, len(revision)),
            "data/detected_share": sum(r["detected"] for r in revision) / max(1, len(revision)),
            "data/verifier_unlabelled": (sum(v["judgment"] is None for r in revision for v in r["verifier"])
                                         / max(1, sum(len(r["verifier"]) for r in revision))),
            **{f"data/transition_{placement}": count / max(1, len(revision))
               for placement, count in zip(TRANSITION_PLACEMENTS, transition_counts(revision))},
            **{f"data/tokens_{kind}": count / max(1, sum(tokens.values())) for kind, count in tokens.items()},
            "sft/steps": steps,
            "sft/loss_first": losses[0],
            "sft/loss_last": losses[-1],
            "time/search_s": search_time,
            "time/iteration_s": time.perf_counter() - started,
        }
        log.metrics(iteration, metrics)
        log.plot(plotted, title=title)
        checkpoint = save_checkpoint(accelerator, run_dir, iteration, {"args": dataclasses.asdict(args)},
                                     {"policy": model}, tokenizer)
        shown = ("eval/", "eval_seen/", "data/first", "search/success")
        accelerator.print(f"iteration {iteration}: " + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()
                                                               if k.startswith(shown)))
    log.close()
    return run_dir


if __name__ == "__main__":
    train(parse_args())
