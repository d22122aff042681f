"""Agent-R: the TextCraft rules, UCT, pairing, the splice and its loss mask, verifier parsing, and one
short end-to-end iteration."""

import json
import random

import pytest

import agent_r
from agent_r import (
    Node, StepVerdict, advance_descents, backup, critique_and_splice, descend, first_bad_step, leaf_paths, loss_mask,
    pair_paths, parse_judgment, phase_two_data, revision_trajectory, search, splice_pair, step_prompt, training_example,
    uct_score, uct_select, verifier_prompt,
)
from tasks.textcraft import (TEXTCRAFT_INSTRUCTIONS, RecipeError, TextCraft, client_action, expert_plan, item_id,
                             noisy_expert, react_turn)

ERROR_ONE_ACTION = "Error: Only one 'Action' is allowed per response. Please adjust your response."


def act(action: str) -> str:
    return react_turn("test", action)


@pytest.fixture(scope="module")
def real_env(shared_data) -> TextCraft:
    return TextCraft.from_source(str(shared_data / "textcraft" / "recipes"))


@pytest.fixture(scope="module")
def synthetic_env() -> TextCraft:
    return TextCraft.from_source("synthetic")


# ---- the environment ----


def test_real_recipes_give_agentgyms_goals_sorted_by_depth_then_name(real_env):
    goals = real_env.goal_list
    depths = [real_env.rules.depth(g) for g in goals]
    assert len(goals) == 544
    assert [depths.count(d) for d in (1, 2, 3, 4)] == [125, 291, 117, 11]
    assert list(zip(depths, goals)) == sorted(zip(depths, goals))


def test_rail_worked_example(real_env):
    """The research notes' example: rail from 54 iron nuggets and one oak log."""
    observation = real_env.reset(real_env.goal_list.index("minecraft:rail"))
    assert observation.startswith("Crafting commands:\n") and observation.endswith("\n\nGoal: craft rail.")
    for line in ("craft 16 rail using 1 stick, 6 iron ingot", "craft 1 iron ingot using 9 iron nugget",
                 "craft 4 stick using 2 planks", "craft 4 oak planks using 1 oak logs"):
        assert line in observation.split("\n")
    assert real_env.step(act("get 6 iron ingot")) == ("Could not find iron ingot", 0.0, False)
    assert real_env.step(act("get 54 iron nugget")) == ("Got 54 iron nugget", 0.0, False)
    for _ in range(6):
        crafted = real_env.step(act("craft 1 iron ingot using 9 iron nugget"))
        assert crafted == ("Crafted 1 minecraft:iron_ingot", 0.0, False)
    assert real_env.step(act("get 1 oak logs")) == ("Got 1 oak logs", 0.0, False)
    assert real_env.step(act("craft 4 oak planks using 1 oak logs")) == ("Crafted 4 minecraft:oak_planks", 0.0, False)
    # "planks" in the recipe is a tag: oak planks stand in for it
    assert real_env.step(act("craft 4 stick using 2 oak planks")) == ("Crafted 4 minecraft:stick", 0.0, False)
    assert real_env.step(act("inventory"))[0] == "Inventory: [iron ingot] (6) [oak planks] (2) [stick] (4) "
    assert real_env.step(act("craft 16 rail using 1 stick, 6 iron ingot")) == ("Crafted 16 minecraft:rail", 1.0, True)


def test_every_error_message(real_env):
    real_env.reset(real_env.goal_list.index("minecraft:rail"))
    cases = [
        (act("jump"), "Could not execute jump"),
        (act("wait"), "Could not execute wait"),  # the revision action is a no-op error at test time
        (act("inventory"), "Inventory: You are not carrying anything."),
        (act("look"), "Could not execute look"),  # no client maps it to "inventory"
        (act("get 1 planks"), "Could not find planks"),  # a tag
        (act("get 1 unobtainium"), "Could not find unobtainium"),
        (act("get 2 stick"), "Could not find stick"),  # craftable
        (act("craft 16 rail using 1 stick, 6 iron ingot"), "Could not find enough items to craft minecraft:rail"),
        (act("craft 4 planks using 1 oak logs"), "Could not find enough items to craft None"),
        (act("craft 1 iron ingot using iron nugget"), "Wrong item format: iron nugget"),
        (act("get 9 iron nugget."), "Got 9 iron nugget"),  # punctuation is dropped, as by AgentGym's client
        (act("craft 1 iron ingot using 8 iron nugget"),
         "Could not find a valid recipe for ItemTagWithCount(item_tag=ItemTag(tag=None, "
         "item_id='minecraft:iron_ingot'), count=1)"),
        (act("craft 5 iron ingot using 9 iron nugget"), "Crafted 1 minecraft:iron_ingot"),  # the recipe sets the count
    ]
    for response, observation in cases:
        assert real_env.step(response) == (observation, 0.0, False), response


def test_the_2024_client_sends_the_text_after_the_last_action_later_lines_glued_on():
    assert client_action("Thought: x\nAction: get 1 oak logs", "2024") == "get 1 oak logs"
    assert client_action("Action: inventory\nAction: get 1 oak logs.", "2024") == "get 1 oak logs"  # the last one
    assert client_action("Thought: x\nAction:\nget 2 stick\nThought: then craft", "2024") == "get 2 stickThought then craft"
    assert client_action("Action: get 1 sand\nInstruction: more", "2024") == "get 1 sand"
    assert client_action("Thought: no action here", "2024") == "Thought no action here"


def test_the_2025_client_sends_one_action_line_and_refuses_two():
    assert client_action("Thought: x\nAction: get 1 oak logs", "2025") == "get 1 oak logs"
    assert client_action("Action: inventory\nAction: get 1 oak logs", "2025") is None
    assert client_action("Thought: x\nAction: get 2 stick.\nThought: then craft", "2025") == "get 2 stick"
    assert client_action("Thought: no action here", "2025") == ""


def test_the_environment_reads_actions_as_its_client(synthetic_env):
    recent = TextCraft(synthetic_env.rules, client="2025")
    first = TextCraft(synthetic_env.rules)  # the 2024 client, Agent-R's
    assert first.instruction == TEXTCRAFT_INSTRUCTIONS["2024"] and recent.client == "2025"
    for env in (first, recent):
        env.reset(0)
    two = "Action: inventory\nAction: get 1 oak logs"
    assert recent.step(two) == (ERROR_ONE_ACTION, 0.0, False)
    assert first.step(two) == ("Got 1 oak logs", 0.0, False)
    assert first.step("Thought: x\nAction: get 1 oak logs\nObservation: Got 1 oak logs") == (
        "Could not find oak logsObservation Got 1 oak logs", 0.0, False)
    assert TextCraft.from_source("synthetic", client="2025").instruction == TEXTCRAFT_INSTRUCTIONS["2025"]


def test_task_index_means_the_same_goal_and_observation_everywhere(synthetic_env):
    again = TextCraft.from_source("synthetic")
    for task in (0, 17, 43, 44, 500):
        assert synthetic_env.reset(task) == again.reset(task)
    assert synthetic_env.reset(3).endswith(synthetic_env.reset(3 + synthetic_env.num_tasks()).rsplit("\n", 1)[-1])


def test_expert_solves_every_synthetic_goal_and_the_noisy_one_fails(synthetic_env):
    rng = random.Random(0)
    for task, goal in enumerate(synthetic_env.goal_list):
        for plan, should_succeed in ((expert_plan(synthetic_env.rules, goal), True),
                                     (noisy_expert(synthetic_env.rules, goal, rng)[0], False)):
            synthetic_env.reset(task)
            rewards = [synthetic_env.step(react_turn(*step))[1] for step in plan]
            assert (rewards[-1] == 1.0) == should_succeed, (goal, plan)


def test_expert_solves_every_real_goal(real_env):
    for task, goal in enumerate(real_env.goal_list):
        real_env.reset(task)
        assert [real_env.step(react_turn(*step))[1] for step in expert_plan(real_env.rules, goal)][-1] == 1.0, goal


def test_recipe_folder_errors_name_the_folder_or_the_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        TextCraft.from_source(str(tmp_path / "missing"))
    with pytest.raises(RecipeError, match="no .json recipe files"):
        TextCraft.from_source(str(tmp_path))
    (tmp_path / "stick.json").write_text('{"type": "minecraft:crafting_shaped", "pattern": ["#"]')
    with pytest.raises(RecipeError, match="stick.json: not valid JSON"):
        TextCraft.from_source(str(tmp_path))
    (tmp_path / "stick.json").write_text('{"type": "minecraft:crafting_shaped", "key": {}}')
    with pytest.raises(RecipeError, match="stick.json: malformed"):
        TextCraft.from_source(str(tmp_path))
    (tmp_path / "stick.json").write_text('{"pattern": ["#"]}')
    with pytest.raises(RecipeError, match="stick.json: not a Minecraft recipe"):
        TextCraft.from_source(str(tmp_path))


def test_synthetic_world_has_tags_depths_and_distractors(synthetic_env):
    rules = synthetic_env.rules
    assert rules.variants(item_id("planks")) == [item_id("birch planks"), item_id("oak planks")]
    assert {rules.depth(g) for g in synthetic_env.goal_list} == {1, 2, 3, 4}
    observation = synthetic_env.reset(synthetic_env.goal_list.index(item_id("iron sword")))
    tree = {r.text for r in rules.recipe_tree(item_id("iron sword"))}
    lines = set(observation.split("\n\n")[0].split("\n")[1:])
    assert tree < lines and 0 < len(lines - tree) <= TextCraft.MAX_DISTRACTORS


# ---- Phase I: UCT, backup, search ----


def hand_tree():
    root = Node(visits=4, value=2.0)
    a = Node("a", visits=3, value=2.0, depth=1, parent=root)
    b = Node("b", visits=1, value=0.0, depth=1, parent=root)
    c = Node("c", depth=1, parent=root)
    root.children = [a, b, c]
    return root, a, b, c


def test_uct_tries_unvisited_children_first_then_the_best_score():
    root, a, b, c = hand_tree()
    assert uct_score(0.0, 0, 4, 0.25) == float("inf")
    assert uct_select(root, 0.25, random.Random(0)) is c
    c.terminal = True  # terminal children are never selected
    # a: 2/3 + 0.25·sqrt(ln 4 / 3) = 0.8366; b: 0 + 0.25·sqrt(ln 4) = 0.2944
    assert uct_score(2.0, 3, 4, 0.25) == pytest.approx(2 / 3 + 0.25 * (1.3862944 / 3) ** 0.5)
    assert uct_select(root, 0.25, random.Random(0)) is a
    # with a large c, exploration wins: b (1 visit) beats a (3 visits)
    assert uct_select(root, 10.0, random.Random(0)) is b
    a.terminal = b.terminal = True
    assert uct_select(root, 0.25, random.Random(0)) is None
    assert descend(root, 0.25, random.Random(0)) is None and root.terminal


def test_uct_breaks_ties_at_random():
    root = Node(visits=2)
    root.children = [Node(str(i), depth=1, parent=root) for i in range(4)]
    picks = {uct_select(root, 0.25, random.Random(seed)).response for seed in range(40)}
    assert picks == {"0", "1", "2", "3"}


def test_backup_adds_the_reward_to_the_whole_path_and_closes_exhausted_subtrees():
    root, a, b, c = hand_tree()
    leaf = Node("x", reward=1.0, depth=2, terminal=True, parent=c)
    c.children = [leaf]
    backup(leaf, 1.0)
    assert (leaf.visits, leaf.value, c.visits, c.value, root.visits, root.value) == (1, 1.0, 1, 1.0, 5, 3.0)
    assert c.terminal and not root.terminal
    assert leaf_paths(root) == [[c, leaf]]


def test_descents_follow_uct_and_backups_count_visits_as_worked_by_hand():
    """root -> a -> {a1 (terminal), a2 -> {a2x (terminal), a2y}, a3}, root -> b -> {b1 (terminal), b2}, with the
    visits and values two earlier backups left (a1: reward 1, a2x and b1: reward 0)."""
    root = Node(visits=3, value=1.0)
    a = Node("a", depth=1, visits=2, value=1.0, parent=root)
    b = Node("b", depth=1, visits=1, value=0.0, parent=root)
    a1 = Node("a1", depth=2, terminal=True, visits=1, value=1.0, parent=a)
    a2 = Node("a2", depth=2, visits=1, value=0.0, parent=a)
    a3 = Node("a3", depth=2, parent=a)
    a2x = Node("a2x", depth=3, terminal=True, visits=1, value=0.0, parent=a2)
    a2y = Node("a2y", depth=3, parent=a2)
    b1 = Node("b1", depth=2, terminal=True, visits=1, value=0.0, parent=b)
    b2 = Node("b2", depth=2, parent=b)
    root.children, a.children, a2.children, b.children = [a, b], [a1, a2, a3], [a2x, a2y], [b1, b2]
    rng = random.Random(0)
    # root: a = 1/2 + 0.25·sqrt(ln 3 / 2) = 0.685, b = 0 + 0.25·sqrt(ln 3) = 0.262; at a, a3 is unvisited
    assert descend(root, 0.25, rng) is a3
    # a3 expands into one terminal child of reward 1: a3 1/1, a 3/2, root 4/2
    leaf = Node("a3x", reward=1.0, depth=3, terminal=True, parent=a3)
    a3.children = [leaf]
    backup(leaf, 1.0)
    assert [(n.visits, n.value) for n in (leaf, a3, a, root)] == [(1, 1.0), (1, 1.0), (3, 2.0), (4, 2.0)]
    assert (a2.visits, b.visits) == (1, 1) and a3.terminal and not a.terminal  # a2 is still open
    # root: a = 2/3 + 0.25·sqrt(ln 4 / 3) = 0.837, b = 0.25·sqrt(ln 4) = 0.294; at a only a2 is open: a2y
    assert descend(root, 0.25, rng) is a2y
    # with c = 1: a = 0.667 + sqrt(ln 4 / 3) = 1.346, b = sqrt(ln 4) = 1.177, still a; with c = 2, b wins
    assert descend(root, 1.0, rng) is a2y and descend(root, 2.0, rng) is b2
    # a2y's only child ends at reward 0: a2 and then a are exhausted, so the next descent goes to b
    leaf = Node("a2yx", depth=4, terminal=True, parent=a2y)
    a2y.children = [leaf]
    backup(leaf, 0.0)
    assert [(n.visits, n.value) for n in (a2y, a2, a, root)] == [(1, 0.0), (2, 0.0), (4, 2.0), (5, 2.0)]
    assert a2.terminal and a.terminal and not root.terminal
    assert descend(root, 0.25, rng) is b2


def test_each_wave_descends_from_the_node_it_just_expanded():
    """A descent at `b` (just expanded) continues into b's children, although the root's UCT prefers `a`."""
    root = Node(visits=2, value=1.0)
    a = Node("a", depth=1, visits=1, value=1.0, parent=root)
    b = Node("b", depth=1, visits=1, value=0.0, parent=root)
    a1 = Node("a1", depth=2, parent=a)
    b1, b2 = Node("b1", depth=2, parent=b), Node("b2", depth=2, terminal=True, parent=b)
    root.children, a.children, b.children = [a, b], [a1], [b1, b2]
    assert advance_descents({0: b}, 0.25, random.Random(0)) == {0: b1}
    # a descent that reaches a terminal node or an exhausted subtree is over
    b1.terminal = True
    assert advance_descents({0: b, 1: a}, 0.25, random.Random(0)) == {1: a1}
    assert b.terminal


class ScriptedAgent:
    """Stands in for the model: proposes fixed turns, and judges a step Bad when it failed."""

    def __init__(self, proposals):
        self.proposals, self.prompts = proposals, []

    def act(self, conversations, n, temperature, seed):
        return [self.proposals(conversation)[:n] for conversation in conversations]

    def verify(self, prompts, temperature, seed):
        self.prompts += prompts
        return ["It failed.\n**Judgment:** **Bad**" if "Current Observation: Could not" in p else "Judgement: Good"
                for p in prompts]


def expert_or_mistake(env):
    """Next turns: the expert's next step, a duplicate of it, and fetching the goal (always an error)."""
    def propose(conversation):
        goal = conversation[2]["content"].rsplit("craft ", 1)[-1].rstrip(".")
        plan = expert_plan(env.rules, item_id(goal))
        done = (len(conversation) - 3) // 2
        step = react_turn(*plan[min(done, len(plan) - 1)])
        return [step, step, act(f"get 1 {goal}")]
    return propose


def test_search_expands_deduplicates_stops_at_done_and_depth_and_backs_up(synthetic_env):
    task = synthetic_env.goal_list.index(item_id("iron bars"))  # 3 expert steps
    make_env = lambda: TextCraft(synthetic_env.rules)  # noqa: E731
    start = agent_r.opening(make_env(), task)
    root = Node(observation=start[2]["content"])
    search([root], [task], [start], ScriptedAgent(expert_or_mistake(synthetic_env)), make_env, iterations=8,
           num_generate=3, max_depth=4, c=0.25, temperature=1.0, seed=0)
    assert [len(n.children) for n in (root, root.children[0])] == [2, 2]  # 3 samples, one duplicate
    paths = leaf_paths(root)
    values = sorted(agent_r.path_value(p) for p in paths)
    assert values[-1] == 1.0 and values[0] == 0.0
    assert all(p[-1].reward == 1.0 or len(p) == 4 for p in paths)  # done, or cut at max_depth
    assert root.visits == len(paths) and root.value == sum(agent_r.path_value(p) for p in paths)
    assert agent_r.tree_to_dict(agent_r.tree_from_dict(agent_r.tree_to_dict(root))) == agent_r.tree_to_dict(root)


def test_one_mcts_iteration_is_one_root_to_leaf_descent(synthetic_env):
    """With one iteration the expanded nodes form one chain from the root: each wave expands a child of the
    node the previous wave expanded, until a terminal node; only the terminal children are backed up."""
    task = synthetic_env.goal_list.index(item_id("iron bars"))
    make_env = lambda: TextCraft(synthetic_env.rules)  # noqa: E731
    start = agent_r.opening(make_env(), task)
    for seed in range(6):
        agent = ScriptedAgent(expert_or_mistake(synthetic_env))
        expanded = []  # the messages after the opening of each expanded node, in order
        act = agent.act
        agent.act = lambda conversations, *rest: expanded.extend(c[3:] for c in conversations) or act(conversations, *rest)
        root = Node(observation=start[2]["content"])
        search([root], [task], [start], agent, make_env, iterations=1, num_generate=3, max_depth=4, c=0.25,
               temperature=1.0, seed=seed)
        assert [len(messages) for messages in expanded] == [2 * depth for depth in range(len(expanded))]
        assert all(later[:-2] == earlier for earlier, later in zip(expanded, expanded[1:])), seed
        terminal = [n for p in leaf_paths(root) for n in p[-1:]]
        assert root.visits == len(terminal) == sum(n.visits for n in terminal)


# ---- Phase I: pairs, critique, splice ----


def test_pairs_need_a_good_path_above_alpha_and_a_gap_above_beta():
    values = [1.0, 0.0, 0.5, 1.0, 0.75]
    assert set(pair_paths(values, alpha=0.5, beta=0.25)) == {(0, 1), (0, 2), (3, 1), (3, 2), (4, 1)}
    assert set(pair_paths(values, alpha=0.75, beta=0.25)) == {(0, 1), (0, 2), (3, 1), (3, 2)}  # strictly above alpha
    assert set(pair_paths(values, alpha=0.5, beta=0.5)) == {(0, 1), (3, 1), (4, 1)}  # strictly above beta
    assert pair_paths([1.0, 1.0], 0.5, 0.2) == []
    assert pair_paths(values, 0.5, 0.25) == pair_paths(values, 0.5, 0.25)  # the official fixed shuffle


@pytest.mark.parametrize("answer,label", [
    ("The step failed.\nJudgment: Bad", "bad"),
    ("Reasons...\nJudgement: Good", "good"),
    ("**Judgment:** **Uncertain**", "uncertain"),
    ("judgment: BAD.", "bad"),
    ("Judgment: Good at first, then on reflection\nJudgment: Bad", "bad"),
    ("This action is good and helpful.", None),
    ("", None),
])
def test_parse_judgment(answer, label):
    assert parse_judgment(answer) == label


def test_first_bad_step_stops_at_an_explicit_bad_only():
    assert first_bad_step(["good", None, "bad", "bad"]) == 2
    assert first_bad_step(["good", "uncertain", None]) == 2  # no verdict of Bad: revise at the end


def test_verifier_prompt_is_the_papers():
    prompt = verifier_prompt("Goal: craft x.", [("get 1 a", "Got 1 a")], "get 1 x", "Could not find x")
    assert prompt.startswith("You are a good verifier of interactive environments.")
    assert "Log:\nTask Description: Goal: craft x.\nAction: get 1 a\nObservation: Got 1 a\nCurrent Action: get 1 x\n" \
           "Current Observation: Could not find x\n" in prompt
    assert prompt.endswith("with the format: Judgment: <Good or Bad or Uncertain>")


def test_the_verifier_sees_the_steps_before_step_k_as_history():
    path = []
    for step, (action, observation) in enumerate([("get 1 a", "Got 1 a"), ("get 1 b", "Could not find b"),
                                                  ("inventory", "Inventory: [a] (1) ")]):
        path.append(Node(act(action), observation, depth=step + 1, parent=path[-1] if path else None))
    assert step_prompt("Goal: craft b.", path, 2) == verifier_prompt(
        "Goal: craft b.", [("get 1 a", "Got 1 a"), ("get 1 b", "Could not find b")], "inventory", "Inventory: [a] (1) ")
    assert "Log:\nTask Description: Goal: craft b.\nAction: get 1 a\nObservation: Got 1 a\nAction: get 1 b\n" \
           "Observation: Could not find b\nCurrent Action: inventory\n" in step_prompt("Goal: craft b.", path, 2)
    assert "Task Description: Goal: craft b.\n\nCurrent Action: get 1 a\nCurrent Observation: Got 1 a\n" \
        in step_prompt("Goal: craft b.", path, 0)


START = [{"role": "user", "content": "Craft the goal."}, {"role": "assistant", "content": "Ok."},
         {"role": "user", "content": "Crafting commands:\ncraft 1 b using 1 a\n\nGoal: craft b."}]
SHARED = (act("get 1 a"), "Got 1 a")
BAD = [SHARED, (act("get 1 b"), "Could not find b")]
GOOD = [SHARED, (act("craft 1 b using 1 a"), "Crafted 1 minecraft:b")]


def test_revision_trajectory_splices_bad_prefix_revision_and_good_continuation():
    messages = revision_trajectory(START, BAD, GOOD, "I made an error. I must determine how to correct it.")
    assert [m["content"] for m in messages[3:]] == [
        SHARED[0], SHARED[1], BAD[1][0], BAD[1][1],
        "Thought: I made an error. I must determine how to correct it.\nAction: wait", "ok.",
        GOOD[1][0], GOOD[1][1],  # the shared first step is not repeated
    ]
    assert loss_mask(messages) == [False] * 7 + [True, False, True, False]


def test_loss_mask_labels_the_revision_and_good_suffix_and_masks_the_bad_prefix(tiny_model_dir):
    from common.models import load_tokenizer
    from common.sft import IGNORE_INDEX

    tokenizer = load_tokenizer(str(tiny_model_dir))
    messages = revision_trajectory(START, BAD, GOOD, "I see an error in my actions. I need to fix it.")
    example = training_example(tokenizer, messages)
    pairs = list(zip(example["input_ids"], example["labels"]))
    trained = tokenizer.decode([t for t, label in pairs if label != IGNORE_INDEX])
    assert trained == ("Thought: I see an error in my actions. I need to fix it.\nAction: wait<|im_end|>"
                       + GOOD[1][0] + "<|im_end|>")
    masked = tokenizer.decode([t for t, label in pairs if label == IGNORE_INDEX])
    for context in (SHARED[0], BAD[1][0], BAD[1][1], START[2]["content"]):
        assert context in masked
    assert len(example["input_ids"]) == len(example["labels"])


def test_revision_logprob_matches_a_token_by_token_loop_and_sums_over_thoughts(tiny_model_dir):
    """Against the obvious computation: render the context with the generation prompt, then score the
    revision turn and its end-of-turn token one token at a time; the thoughts' probabilities add up."""
    import math

    import torch

    from common.models import load_policy

    model, tokenizer = load_policy(str(tiny_model_dir))
    thoughts = agent_r.REVISION_THOUGHTS[:2]
    contexts = [conversation_upto(BAD), conversation_upto(BAD[:1]), conversation_upto(GOOD)]

    def loop(context, thought):
        ids = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(ids, add_special_tokens=False)["input_ids"]
        turn = tokenizer(react_turn(thought, "wait") + "<|im_end|>", add_special_tokens=False)["input_ids"]
        total = 0.0
        for token in turn:
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1].double()
            total += (logits.log_softmax(-1)[token]).item()
            ids = ids + [token]
        return total

    expected = [math.log(sum(math.exp(loop(c, t)) for t in thoughts)) for c in contexts]
    for batch_size in (1, 16):  # padding changes nothing
        got = agent_r.revision_logprob(model, tokenizer, contexts, thoughts, batch_size=batch_size)
        assert got == pytest.approx(expected, abs=1e-3)
    single = agent_r.revision_logprob(model, tokenizer, contexts[:1], thoughts[:1])
    assert single == pytest.approx([loop(contexts[0], thoughts[0])], abs=1e-3)


def test_first_error_state_is_the_conversation_up_to_the_first_error_observation():
    episode = agent_r.Episode(0, START, turns=[(SHARED[0], SHARED[1]), (BAD[1][0], BAD[1][1]),
                                               (act("inventory"), "Could not find iron bars")])
    state = agent_r.first_error_state(episode)
    assert state[-1] == {"role": "user", "content": BAD[1][1]} and len(state) == len(START) + 4
    assert agent_r.first_error_state(agent_r.Episode(0, START, turns=list(GOOD))) is None


def conversation_upto(turns):
    return agent_r.conversation(START, turns)


def chain(parent, steps, rewards=None):
    """Nodes under `parent`, one per (response, observation) step, the last terminal with its reward."""
    nodes = []
    for k, (response, observation) in enumerate(steps):
        node = Node(response, observation, depth=parent.depth + 1, parent=parent)
        parent.children.append(node)
        nodes.append(node)
        parent = node
    nodes[-1].terminal, nodes[-1].reward = True, (rewards or 0.0)
    backup(nodes[-1], nodes[-1].reward)
    return nodes


SCRIPTED_GOOD = [(act("get 1 c"), "Got 1 c"), (act("craft 1 b using 1 a, 1 c"), "Crafted 1 minecraft:b")]
SCRIPTED_BAD = [(act("get 1 b"), "Could not find b"), (act("inventory"), "Inventory: [a] (1) ")]


def scripted_tree():
    """root -> s ("get 1 a") -> good: "get 1 c", "craft 1 b ..." (reward 1); bad: "get 1 b" (an error),
    "inventory" (reward 0)."""
    root = Node(observation=START[2]["content"])
    (shared,) = chain(root, [SHARED])
    shared.terminal = False
    root.visits = shared.visits = 0
    root.value = shared.value = 0.0
    good = [shared, *chain(shared, SCRIPTED_GOOD, 1.0)]
    bad = [shared, *chain(shared, SCRIPTED_BAD)]
    return root, good, bad


def test_splice_keeps_t_prime_in_the_bad_prefix_and_continues_after_the_shared_steps():
    _, good, bad = scripted_tree()
    thought = agent_r.REVISION_THOUGHTS[0]
    verdicts = [StepVerdict("fine", "good"), StepVerdict("failed", "bad"), StepVerdict("fine", "good")]
    record = splice_pair(START, good, bad, verdicts, thought)
    revise = [react_turn(thought, "wait"), "ok."]
    assert [m["content"] for m in record["messages"][3:]] == [
        *SHARED, *SCRIPTED_BAD[0], *revise, *SCRIPTED_GOOD[0], *SCRIPTED_GOOD[1]]  # t' = 1 kept; not step 2
    assert loss_mask(record["messages"]) == [False] * 7 + [True, False] * 3
    assert (record["first_bad_step"], record["bad_length"], record["detected"]) == (2, 3, True)
    assert [v["judgment"] for v in record["verifier"]] == ["good", "bad"]  # the walk stops at t'
    # t' at the shared first step: the whole good path after it follows
    record = splice_pair(START, good, bad, [StepVerdict("no", "bad")], thought)
    assert [m["content"] for m in record["messages"][3:]] == [*SHARED, *revise, *SCRIPTED_GOOD[0], *SCRIPTED_GOOD[1]]
    assert record["first_bad_step"] == 1
    # nothing judged Bad, or nothing walked (Direct-Revision): the whole bad path, then the revision
    for walked in ([StepVerdict("", "good"), StepVerdict("", None), StepVerdict("", "uncertain")], []):
        record = splice_pair(START, good, bad, walked, thought)
        assert [m["content"] for m in record["messages"][3:9]] == [*SHARED, *SCRIPTED_BAD[0], *SCRIPTED_BAD[1]]
        assert record["messages"][9]["content"] == revise[0] and record["first_bad_step"] == 3
        assert not record["detected"]
    # a good path whose first response differs (the same action, another thought) follows in full
    other = Node(react_turn("I need a.", "get 1 a"), "Got 1 a", depth=1)
    record = splice_pair(START, [other, *good[1:]], bad, verdicts, thought)
    assert [m["content"] for m in record["messages"][9:]] == [other.response, "Got 1 a", *SCRIPTED_GOOD[0],
                                                              *SCRIPTED_GOOD[1]]


def test_critique_and_splice_asks_each_step_with_its_history_and_splices_at_the_verdict():
    root, good, bad = scripted_tree()
    agent = ScriptedAgent(None)
    revision, good_records = critique_and_splice([root], [7], [START], agent, alpha=0.5, beta=0.2, pairs_per_task=None,
                                                 transition="model", verifier_temperature=0.0, seed=0,
                                                 thoughts=agent_r.REVISION_THOUGHTS[:1])
    task = START[2]["content"]
    assert agent.prompts == [step_prompt(task, bad, 0), step_prompt(task, bad, 1)]  # step 2 is never asked
    (record,) = revision
    assert record == {"task": 7} | splice_pair(START, good, bad, [StepVerdict("Judgement: Good", "good"),
                                                                  StepVerdict("It failed.\n**Judgment:** **Bad**", "bad")],
                                               agent_r.REVISION_THOUGHTS[0])
    assert [r["messages"] for r in good_records] == [agent_r.good_trajectory(START, [(n.response, n.observation)
                                                                                     for n in good])]


def test_critique_finds_the_first_bad_step_and_shares_verdicts(synthetic_env):
    """A hand-made tree: one good path and two bad ones that fail at their second step."""
    root = Node(observation=START[2]["content"])
    shared = Node(*SHARED, depth=1, parent=root)
    good = Node(GOOD[1][0], GOOD[1][1], reward=1.0, depth=2, terminal=True, parent=shared)
    bad = Node(*BAD[1], depth=2, terminal=True, parent=shared)
    other = Node(act("inventory"), "Inventory: [a] (1) ", depth=2, terminal=True, parent=shared)
    shared.children = [good, bad, other]
    root.children = [shared]
    for leaf in (good, bad, other):
        backup(leaf, leaf.reward)
    agent = ScriptedAgent(None)
    revision, good_records = critique_and_splice([root], [7], [START], agent, alpha=0.5, beta=0.2, pairs_per_task=None,
                                                 transition="model", verifier_temperature=0.0, seed=0)
    assert len(good_records) == 1 and len(revision) == 2
    by_bad = {r["verifier"][-1]["action"]: r for r in revision}
    assert by_bad["get 1 b"]["first_bad_step"] == 2 and by_bad["get 1 b"]["detected"]
    assert by_bad["inventory"]["first_bad_step"] == 2 and not by_bad["inventory"]["detected"]  # none Bad: the end
    assert len(agent.prompts) == 3  # the shared first step is judged once for both walks
    ended, _ = critique_and_splice([root], [7], [START], agent, 0.5, 0.2, None, "end", 0.0, 0)
    assert len(agent.prompts) == 3 and all(not r["verifier"] for r in ended)


# ---- Phase II data and arguments ----


def test_eta_caps_the_general_chats_at_eta_per_agent_trajectory():
    agent = [[{"role": "assistant", "content": f"agent {k}", "loss": True}] for k in range(10)]
    general = [[{"role": "assistant", "content": f"chat {k}", "loss": True}] for k in range(30)]
    mixed = phase_two_data(agent, general, 0.2, seed=0)
    assert mixed[:10] == agent and len(mixed) == 12  # 0.2 x 10 agent trajectories
    assert all(chat in general for chat in mixed[10:]) and mixed[10] != mixed[11]  # drawn without replacement
    assert len(phase_two_data(agent, general, 0.5, 0)) == 15
    assert phase_two_data(agent, general, 0.0, 0) == agent
    assert phase_two_data(agent, general[:3], 1.0, 0)[10:] != [] and len(phase_two_data(agent, general[:3], 1.0, 0)) == 13
    assert phase_two_data(agent, general, 0.2, 0) == mixed and phase_two_data(agent, general, 0.2, 1) != mixed


def reference_loss(model, tokenizer, messages):
    """The obvious SFT loss of one conversation: the mean of -log p over the tokens of its trained assistant
    turns (end of turn included), each turn scored after the chat template's rendering of what precedes it."""
    import torch

    total, count = 0.0, 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant" or not message["loss"]:
            continue
        context = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages[:k]],
                                                add_generation_prompt=True, tokenize=False)
        ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        turn = tokenizer(message["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = model(torch.tensor([ids + turn])).logits[0].double().log_softmax(-1)
        total -= sum(logprobs[len(ids) + j - 1, token].item() for j, token in enumerate(turn))
        count += len(turn)
    return total / count


def test_phase_two_sft_trains_the_revision_turn_and_good_continuation_only(tiny_model_dir):
    """End to end from a scripted tree: the critique's revision and good trajectories and a general chat, each
    one SFT batch: its first loss is the reference loss of its trained turns, the bad prefix not among them;
    the second step's loss is the reference loss after the first update."""
    from common.models import load_policy
    from common.sft import sft_train

    root, _, _ = scripted_tree()
    revision, good = critique_and_splice([root], [7], [START], ScriptedAgent(None), 0.5, 0.2, None, "model", 0.0, 0)
    general = [[{"role": "user", "content": "Hi", "loss": False}, {"role": "assistant", "content": "Hello.", "loss": True}]]
    mixed = phase_two_data([r["messages"] for r in revision + good], general, eta=0.5, seed=0)
    assert len(mixed) == 3
    for messages in mixed:
        model, tokenizer = load_policy(str(tiny_model_dir))
        example = training_example(tokenizer, messages)
        expected = [reference_loss(model, tokenizer, messages)]
        record_after_first = lambda step, loss: expected.append(reference_loss(model, tokenizer, messages))  # noqa: E731
        losses = sft_train(model, [example], steps=2, batch_size=1, lr=1e-3, warmup_steps=1, progress=False,
                           callback=record_after_first)
        assert losses == pytest.approx(expected[:2], rel=1e-4) and losses[1] < losses[0]
    # the bad prefix is context: had it been trained, the revision trajectory's loss would be another
    unmasked = [m | {"loss": m["role"] == "assistant"} for m in mixed[0]]
    assert reference_loss(model, tokenizer, unmasked) != pytest.approx(reference_loss(model, tokenizer, mixed[0]))


def test_general_chats_read_sharegpt_and_openai_rows_and_name_bad_rows(tmp_path):
    from common.data import DataError

    path = tmp_path / "chats.jsonl"
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chats = agent_r.load_general_chats(str(path))
    assert [loss_mask(c) for c in chats] == [[False, True], [False, True]]
    assert chats[0][1]["content"] == "Hello." and chats[1][0]["role"] == "user"
    path.write_text(json.dumps({"text": "no chat here"}) + "\n")
    with pytest.raises(DataError, match="row 0 has neither 'messages' nor 'conversations'"):
        agent_r.load_general_chats(str(path))


def test_arguments_that_cannot_work_stop_with_the_fix():
    with pytest.raises(ValueError, match="pass --recipes"):
        agent_r.parse_args(["--scale", "paper"])
    args = agent_r.parse_args(["--model", "some/model"])
    with pytest.raises(ValueError, match="needs --model tiny-textcraft"):
        agent_r.resolve_general_data(args, "some/model")
    with pytest.raises(ValueError, match="pick 1 to 10"):
        agent_r.parse_args(["--revision-thoughts", "0"])
    cpu = agent_r.parse_args([])
    assert cpu.eval_tasks == agent_r.synthetic_eval_tasks()
    assert cpu.eval_seen_tasks == agent_r.synthetic_seen_tasks(cpu.train_pool)
    with pytest.raises(ValueError, match="leaves no training task"):
        agent_r.training_pool(4, 2, [0, 1])


def test_no_held_out_goal_or_seed_is_ever_trained_on(synthetic_env):
    assert agent_r.training_pool(6, 4, [1]) == [0, 2, 3, 4]  # index 5 names goal 1 again
    assert agent_r.training_pool(10, 4, [1], held_out_seeds=[8]) == [0, 2, 3, 4, 6, 7]
    cpu = agent_r.parse_args([])
    num_goals = synthetic_env.num_tasks()
    pool = agent_r.training_pool(cpu.train_pool, num_goals, cpu.eval_tasks, cpu.eval_seen_tasks)
    goal = lambda task: synthetic_env.goal_list[task % num_goals]  # noqa: E731
    held_out_goals = {goal(t) for t in cpu.eval_tasks}
    assert len(held_out_goals) == 11 and not held_out_goals & {goal(t) for t in pool}
    assert {synthetic_env.rules.depth(g) for g in held_out_goals} == {1, 2, 3, 4}
    # the held-out seeds are indices outside the pool whose goals are trained on
    assert not set(pool) & set(cpu.eval_seen_tasks) and len(cpu.eval_seen_tasks) == 22
    assert {goal(t) for t in cpu.eval_seen_tasks} <= {goal(t) for t in pool}
    # the shipped tiny agent's demonstrations leave out the same goals
    from tasks.tiny_textcraft import WarmStart

    assert WarmStart().held_out == cpu.eval_tasks and WarmStart().train_pool == cpu.train_pool


def test_a_revision_turn_is_answered_ok_and_not_executed_as_in_training(synthetic_env):
    """At test time and in the search the revision turn gets the observation its training data shows, not
    TextCraft's "Could not execute wait"; every other turn is the environment's."""
    env = TextCraft(synthetic_env.rules, synthetic_env.instruction)
    env.reset(0)
    before = env.step(act("inventory"))
    assert agent_r.act_in(env, react_turn(agent_r.REVISION_THOUGHTS[3], "wait")) == ("ok.", 0.0, False)
    assert env.step(act("inventory")) == before  # nothing happened in the environment
    assert agent_r.act_in(env, act("wait now")) == env.step(act("wait now"))  # not the revision action
    assert "Could not execute" in env.step(act("wait"))[0]


def test_repeated_actions_count_steps_that_repeat_action_and_observation():
    turns = [(act("get 1 a"), "Got 1 a"), (act("get 1 a"), "Got 1 a"),  # the thought does not matter, only the action
             (act("craft 1 b using 1 c"), "Could not find enough items to craft minecraft:b"),
             ("Thought: again\nAction: craft 1 b using 1 c", "Could not find enough items to craft minecraft:b"),
             (act("craft 1 b using 1 c"), "Could not find enough items to craft minecraft:b")]
    assert agent_r.repeated_actions(turns) == 3
    assert agent_r.repeated_actions(turns[:1]) == 0


# ---- end to end ----


@pytest.mark.slow
def test_one_iteration_end_to_end_and_resume(tiny_model_dir, tmp_path):
    """The whole loop with a random tiny model: alpha and beta below 0 make every path count as good and
    every pair as distinguishable, so the random model's failures still exercise every stage."""
    import torch

    from common.models import load_policy

    run_dir = tmp_path / "run"
    general = tmp_path / "sharegpt.jsonl"
    chat = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    general.write_text(json.dumps({"conversations": chat}) + "\n")
    argv = ["--model", str(tiny_model_dir), "--run-dir", str(run_dir), "--iterations", "1", "--train-tasks", "2",
            "--train-pool", "60", "--eval-tasks", "0", "44", "--mcts-iterations", "2", "--num-generate", "2",
            "--max-depth", "2", "--max-new-tokens", "12", "--verifier-max-new-tokens", "8", "--alpha", "-1",
            "--beta", "-0.5", "--pairs-per-task", "3", "--epochs", "1", "--batch-size", "4", "--lr", "1e-3",
            "--eval-max-steps", "2", "--general-data", str(general), "--eta", "0.5"]
    agent_r.train(agent_r.parse_args(argv))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[1]["data/revision_trajectories"] > 0 and rows[1]["data/good_trajectories"] > 0
    shares = {kind: rows[1][f"data/tokens_{kind}"] for kind in agent_r.TOKEN_KINDS}
    assert sum(shares.values()) == pytest.approx(1) and all(shares.values())  # every kind is trained
    assert sum(rows[1][f"data/transition_{p}"] for p in agent_r.TRANSITION_PLACEMENTS) == pytest.approx(1)
    assert all(f"eval/after_revision_{kind}" in rows[1] for kind in agent_r.AFTER_REVISION)
    assert (run_dir / "curves.png").is_file() and (run_dir / "checkpoint-000001" / "policy").is_dir()
    trees = sorted((run_dir / "iteration-1" / "trees").glob("*.json"))
    assert len(trees) == 2
    data = json.loads((run_dir / "iteration-1" / "trajectories.json").read_text())
    assert all(loss_mask(r["messages"])[-2] for r in data["revision"])
    trained, _ = load_policy(str(run_dir / "checkpoint-000001" / "policy"))
    initial, _ = load_policy(str(tiny_model_dir))
    assert all(not torch.equal(p, q) for p, q in zip(trained.parameters(), initial.parameters()))

    stamps = [t.stat().st_mtime_ns for t in trees]
    agent_r.train(agent_r.parse_args(argv[:5] + ["2"] + argv[6:] + ["--resume"]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [t.stat().st_mtime_ns for t in trees] == stamps  # iteration 1 was not searched again
    assert (run_dir / "checkpoint-000002").is_dir()


def test_the_shipped_agent_serves_any_subset_of_its_held_out_tasks(monkeypatch):
    """A run that evaluates fewer held-out tasks (the notebook's short run) uses the shipped tiny agent; a held-out
    task the shipped agent may have trained on needs an agent built without it."""
    import tasks.tiny_textcraft

    built = []
    monkeypatch.setattr(tasks.tiny_textcraft, "warm_start", lambda config, out_dir: built.append(config) or out_dir)
    cpu = agent_r.parse_args([])
    shipped = str(agent_r.resolve_model(cpu))
    assert shipped.endswith("models/tiny-textcraft") and not built
    fewer = agent_r.parse_args(["--eval-tasks", *map(str, cpu.eval_tasks[::3]),
                                "--eval-seen-tasks", *map(str, cpu.eval_seen_tasks[::3])])
    assert str(agent_r.resolve_model(fewer)) == shipped and not built
    trained_on = next(task for task in agent_r.training_pool(cpu.train_pool, 10_000, cpu.eval_tasks, cpu.eval_seen_tasks))
    other = agent_r.parse_args(["--eval-seen-tasks", *map(str, cpu.eval_seen_tasks), str(trained_on)])
    assert str(agent_r.resolve_model(other)) != shipped and built[0].held_out_seeds[-1] == trained_on


def test_where_t_prime_falls_on_its_bad_path():
    """t' (1-based) against the steps the bad path shares with the good one and its first error observation."""
    place = agent_r.transition_placement
    assert place(1, 1, 2) == "shared"  # the good path took that step too, then succeeded
    assert place(2, 1, 3) == "before_error" and place(3, 1, 3) == "at_error" and place(4, 1, 3) == "after_error"
    assert place(2, 1, None) == "no_error" and place(2, 2, None) == "shared"
    records = [{"first_bad_step": t, "shared_steps": 1, "first_error_step": e} for t, e in ((1, 2), (2, 2), (2, 2), (3, None))]
    assert agent_r.transition_counts(records) == [1, 0, 2, 0, 1]
    # the scripted pair: one shared step, then "get 1 b" is refused (step 2)
    _, good, bad = scripted_tree()
    record = splice_pair(START, good, bad, [StepVerdict("", "good"), StepVerdict("", "bad")], agent_r.REVISION_THOUGHTS[0])
    assert (record["shared_steps"], record["first_error_step"], record["first_bad_step"]) == (1, 2, 2)
    record = splice_pair(START, good, bad, [StepVerdict("", "bad")], agent_r.REVISION_THOUGHTS[0])
    assert place(record["first_bad_step"], record["shared_steps"], record["first_error_step"]) == "shared"


def test_trained_tokens_by_kind_match_one_kind_trained_at_a_time(tiny_model_dir):
    """The counts against a slow reference: each kind's messages alone trained, the SFT labels counted."""
    from common.models import load_tokenizer
    from common.sft import IGNORE_INDEX, tokenize_chat

    tokenizer = load_tokenizer(str(tiny_model_dir))
    _, good, bad = scripted_tree()
    revision = splice_pair(START, good, bad, [StepVerdict("", "good"), StepVerdict("", "bad")],
                           agent_r.REVISION_THOUGHTS[2])["messages"]
    good_only = agent_r.good_trajectory(START, [(n.response, n.observation) for n in good])
    general = [[{"role": "user", "content": "Hi", "loss": False}, {"role": "assistant", "content": "Hello there.", "loss": True}]]
    counts = agent_r.trained_token_counts(tokenizer, [revision, good_only], general)

    def labelled(messages, which):
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        flags = [trained and k in which for k, trained in enumerate(loss_mask(messages))]
        return sum(label != IGNORE_INDEX for label in tokenize_chat(tokenizer, plain, flags).labels)

    revision_at = next(k for k, m in enumerate(revision) if m.get("loss") and "Action: wait" in m["content"])
    after = [k for k in range(revision_at + 1, len(revision)) if revision[k].get("loss")]
    assert counts == {"revision_turn": labelled(revision, {revision_at}), "after_revision": labelled(revision, set(after)),
                      "good": labelled(good_only, set(range(len(good_only)))), "general": labelled(general[0], {1})}
    assert all(counts.values())
    assert sum(counts.values()) == sum(labelled(m, set(range(len(m)))) for m in [revision, good_only, *general])


def test_what_follows_a_revision_turn():
    wait = react_turn("I made an error.", "wait")
    turns = [("Action: get 1 b", "Could not find b"), (wait, "ok."), ("Action: get 1 b", "Could not find b"),
             (wait, "ok."), (wait, "ok."), ("Action: get 1 c", "Got 1 c"), (wait, "ok.")]
    assert agent_r.after_revision(turns) == ["error", "revision", "progress", "end"]
    turns = [("Action: get 1 c", "Got 1 c"), (wait, "ok."), ("Action: get 1 c", "Got 1 c")]
    assert agent_r.after_revision(turns) == ["repeat"] and agent_r.after_revision(turns, first=2) == []


def test_revision_only_training_trains_no_good_trajectory(tiny_model_dir, tmp_path):
    """--no-good-trajectories: Phase II trains on the revision trajectories alone (none of the tokens are a good
    trajectory's); both flags off is refused."""
    with pytest.raises(ValueError, match="nothing to train on"):
        agent_r.parse_args(["--no-revision", "--no-good-trajectories"])
    run_dir = tmp_path / "run"
    argv = ["--model", str(tiny_model_dir), "--run-dir", str(run_dir), "--iterations", "1", "--train-tasks", "2",
            "--train-pool", "60", "--eval-tasks", "0", "--mcts-iterations", "2", "--num-generate", "2",
            "--max-depth", "2", "--max-new-tokens", "12", "--verifier-max-new-tokens", "8", "--alpha", "-1",
            "--beta", "-0.5", "--pairs-per-task", "3", "--epochs", "1", "--batch-size", "4", "--lr", "1e-3",
            "--eval-max-steps", "2", "--general-data", "None", "--no-good-trajectories"]
    agent_r.train(agent_r.parse_args(argv))
    row = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1]
    assert row["data/good_trajectories"] > 0 and row["data/tokens_good"] == 0.0
    assert row["data/tokens_revision_turn"] > 0 and row["data/tokens_revision_turn"] + row["data/tokens_after_revision"] == pytest.approx(1)


def test_a_revision_thought_in_a_turn_that_acts_is_a_leak():
    turns = [(react_turn("I need to revise it.", "get 2 bone"), "Got 2 bone"),  # a sentence of the first thought
             (react_turn("I realize my approach was flawed. I need to revise it.", "wait"), "ok."),  # a revision turn
             (react_turn("bone meal needs bone.", "get 1 bone"), "Got 1 bone"),
             (react_turn("I made an error.", "craft 1 bone meal using 1 bone"), "Crafted 1 minecraft:bone_meal")]
    assert agent_r.revision_thought_leaks(turns) == (2, 3)  # the first and the last; the revision turn is not counted
    assert agent_r.revision_thought_leaks(turns, agent_r.REVISION_THOUGHTS[9:]) == (1, 3)  # "I made an error. ..."
    assert agent_r.revision_thought_leaks(turns, agent_r.REVISION_THOUGHTS[:1]) == (1, 3)
    assert agent_r.revision_thought_leaks(turns[2:3]) == (0, 1)
