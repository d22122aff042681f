"""Agent-R's world: TextCraft (Minecraft crafting in text, AgentGym's `agentenv_textcraft`) in pure Python, with
the rules and messages of the original; a small synthetic recipe set for the CPU default; the ReAct turn
format; and an expert planner over the recipe graph, for the tiny agent's demonstrations and the revision test.

`Environment` is what agent_r.py needs from an environment; a second one (WebShop, SciWorld) implements it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol


# AgentGym's TextCraft instructions (the first user turn), verbatim; Agent-R's agent answers "Ok.". The client of
# AgentGym's first release (June 2024, commit f434743), which Agent-R ran on:
TEXTCRAFT_INSTRUCTION_2024 = (
    'You are given few useful crafting recipes to craft items in Minecraft. Crafting commands are of the format '
    '"craft [target object] using [input ingredients]".\nEvery round I will give you an observation, you have to '
    'respond an action based on the state and instruction. You can "get" an object (ingredients) from the '
    'inventory or the environment, look-up the game inventory by "inventory", or "craft" (target) using any of '
    'the crafting commands. You can use ONLY these crafting commands provided, do not use your own crafting '
    'commands. However, if the crafting command uses a generic ingredient like "planks", you can use special types '
    'of the same ingredient e.g. "dark oak planks" in the command instead.\nYour response should use the following '
    'format:\n\nThought:\n ... \n\nAction:\n ... '
)
# and the client of its September 2025 update (commit 640f8bc):
TEXTCRAFT_INSTRUCTION_2025 = (
    'You are given few useful crafting recipes to craft items in Minecraft. Crafting commands are of the format '
    '"craft [target object] using [input ingredients]".\nEvery round I will give you an observation, you have to '
    'respond an action based on the state and instruction. You can "get" an object (ingredients) from the '
    'inventory or the environment, look-up the game inventory by "inventory", or "craft" (target) using any of '
    'the crafting commands.\nYour output must strictly follow this format:"Thought:\\nyour thoughts.\\n\\n'
    'Action:\\nyour next action"\n\nReminder: \n1. Always specify the quantity when using "get" and "craft" '
    'commands. - Example of get: get 1 lapis lazuli - Example1 of craft: craft 1 blue dye using 1 lapis lazuli '
    '- Example2 of craft: craft 1 golden carrot using 8 gold nugget, 1 carrot\n2. When using "get" command, do '
    'not specify whether the item comes from the inventory or the environment.\n3. You can use ONLY crafting '
    'commands provided, do not use your own crafting commands. However, if the crafting command uses a generic '
    'ingredient like "planks", you can use special types of the same ingredient e.g. "dark oak planks" in the '
    'command instead.\n\n'
)

TEXTCRAFT_INSTRUCTIONS = {"2024": TEXTCRAFT_INSTRUCTION_2024, "2025": TEXTCRAFT_INSTRUCTION_2025}

# The CPU default's instruction: a tiny model pays for every prompt token and cannot read the long one.
CPU_INSTRUCTION = "Craft the goal with the crafting commands. Answer with a Thought and an Action."


class Environment(Protocol):
    """What Agent-R needs from an environment. A second one (WebShop, SciWorld) implements these four
    members; the rest of agent_r.py is environment-agnostic."""

    instruction: str  # the first user turn of every episode

    def num_tasks(self) -> int: ...

    def reset(self, task_index: int) -> str:
        """Start task `task_index`; return the first observation (the task description)."""

    def step(self, response: str) -> tuple[str, float, bool]:
        """Execute the model's whole turn ("Thought: ...\\nAction: ..."); return (observation, reward, done)."""


class RecipeError(ValueError):
    """A recipe folder is missing, empty, or holds a file that is not a valid recipe."""


@dataclass(frozen=True)
class Ingredient:
    name: str  # "minecraft:iron_nugget", or a tag such as "minecraft:planks"
    count: int
    is_tag: bool = False


@dataclass(frozen=True)
class Recipe:
    inputs: tuple[Ingredient, ...]
    output: str  # item id
    count: int  # how many one craft makes
    output_tag: str | None = None  # the recipe's "group", e.g. "minecraft:planks" for oak planks

    @property
    def text(self) -> str:
        """The crafting command as TextCraft shows it: "craft 16 rail using 1 stick, 6 iron ingot"."""
        inputs = ", ".join(f"{i.count} {display_name(i.name)}" for i in self.inputs)
        return f"craft {self.count} {display_name(self.output)} using {inputs}"


class _GivenInput(NamedTuple):
    """An input of a craft command as the server reads it (its ItemTagWithCount): an item id, or None and a tag."""

    item: str | None
    tag: str | None
    count: int


def display_name(item_id: str) -> str:
    return item_id.replace("minecraft:", "").replace("_", " ")


def item_id(name: str) -> str:
    return "minecraft:" + name.replace(" ", "_")


def load_recipe_folder(folder: str | Path) -> dict[str, dict]:
    """Every `*.json` recipe file of `folder` (AgentGym's `agentenv_textcraft/recipes`), by file name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RecipeError(
            f"the recipe folder {folder} does not exist; pass --recipes with the folder of TextCraft recipe "
            f"JSON files (AgentGym's agentenv_textcraft/recipes), or --recipes synthetic"
        )
    files = sorted(folder.glob("*.json"))
    if not files:
        raise RecipeError(f"the recipe folder {folder} holds no .json recipe files")
    recipes = {}
    for path in files:
        try:
            recipes[path.name] = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RecipeError(f"{path}: not valid JSON ({error}); fix or remove the file") from error
    return recipes


class CraftingRules:
    """AgentGym's `CraftingTree`: which items are craftable and how, which are fetched, recipe depths.

    Built from Minecraft recipe JSONs as AgentGym builds it: only `crafting_shaped` (each key counted as
    often as it occurs in the pattern) and `crafting_shapeless` recipes; recipes that turn a single
    `*_block` back into items are dropped; a recipe whose output is already among its inputs' transitive
    ingredients is dropped (cycles); a tag ingredient that no craftable item carries (e.g. `oak_logs`)
    becomes an ordinary item that can be fetched. Files are read in name order, so the cycle rule, which
    depends on order, gives the same result everywhere.
    """

    def __init__(self, recipe_jsons: dict[str, dict]):
        self.recipes: dict[str, list[Recipe]] = {}  # item id -> recipes making it
        self.tag_recipes: dict[str, list[Recipe]] = {}  # tag -> recipes of the items carrying it
        self.items: set[str] = set()  # every known item id
        self.tags: set[str] = set()
        self.tag_of: dict[str, str] = {}  # item id -> its tag ("group")
        dependencies: dict[str, set[str]] = {}
        for source, data in sorted(recipe_jsons.items()):
            recipe = self._parse(source, data)
            if recipe is None:
                continue
            inputs = [i.name for i in recipe.inputs]
            if any(recipe.output in dependencies.get(name, ()) for name in inputs):
                continue  # a cycle
            self.recipes.setdefault(recipe.output, []).append(recipe)
            deps = dependencies.setdefault(recipe.output, set())
            for name in inputs:
                deps.add(name)
                deps.update(dependencies.get(name, ()))
            if recipe.output_tag is not None:
                self.tag_recipes.setdefault(recipe.output_tag, []).append(recipe)
        # a tag no craftable item carries is an ordinary (fetchable) item
        fetchable_tags = {
            i.name for recipes in self.recipes.values() for r in recipes for i in r.inputs
            if i.is_tag and not any(self.tag_of.get(item) == i.name for item in self.recipes)
        }
        self.tags -= fetchable_tags
        self.items |= fetchable_tags
        for output, recipes in self.recipes.items():
            self.recipes[output] = [self._untag(r, fetchable_tags) for r in recipes]
        for tag, recipes in self.tag_recipes.items():
            self.tag_recipes[tag] = [self._untag(r, fetchable_tags) for r in recipes]
        self._depth: dict[str, int] = {}
        self.uses: dict[str, list[Recipe]] = {}  # ingredient name -> recipes using it (distractors)
        for recipes in self.recipes.values():
            for recipe in recipes:
                for ingredient in recipe.inputs:
                    self.uses.setdefault(ingredient.name, []).append(recipe)

    def _parse(self, source: str, data: dict) -> Recipe | None:
        def bad(why: str) -> RecipeError:
            return RecipeError(f"{source}: {why}; fix or remove the file")

        if not isinstance(data, dict) or "type" not in data:
            raise bad("not a Minecraft recipe (no 'type' field)")
        kind = data["type"]
        if kind not in ("minecraft:crafting_shaped", "minecraft:crafting_shapeless"):
            return None  # smelting, stonecutting, ...: not part of TextCraft
        counts: dict[tuple[str, bool], int] = {}
        try:
            if kind == "minecraft:crafting_shaped":
                pairs = [(entry, sum(line.count(symbol) for line in data["pattern"]))
                         for symbol, entry in data["key"].items()]
            else:
                pairs = [(entry, 1) for entry in data["ingredients"]]
            for entry, count in pairs:
                entry = entry[0] if isinstance(entry, list) else entry  # alternatives: AgentGym takes the first
                if "item" in entry:
                    key = (entry["item"], False)
                    self.items.add(entry["item"])
                elif "tag" in entry:
                    key = (entry["tag"], True)
                    self.tags.add(entry["tag"])
                else:
                    raise bad(f"an ingredient has neither 'item' nor 'tag': {entry}")
                counts[key] = counts.get(key, 0) + count
            result = data["result"]
            output, made = (result, 1) if isinstance(result, str) else (result["item"], result.get("count") or 1)
        except (KeyError, TypeError, IndexError) as error:
            raise bad(f"malformed {kind} recipe ({type(error).__name__}: {error})") from error
        self.items.add(output)
        inputs = tuple(Ingredient(name, count, is_tag) for (name, is_tag), count in counts.items())
        if len(inputs) == 1 and inputs[0].name.endswith("_block"):
            return None  # block decompression (iron block -> 9 iron ingot) is not used
        output_tag = None
        if "group" in data:
            output_tag = "minecraft:" + data["group"]
            if output_tag != output:
                self.tags.add(output_tag)
                self.tag_of[output] = output_tag
        return Recipe(inputs, output, made, output_tag)

    @staticmethod
    def _untag(recipe: Recipe, fetchable_tags: set[str]) -> Recipe:
        inputs = tuple(Ingredient(i.name, i.count, i.is_tag and i.name not in fetchable_tags) for i in recipe.inputs)
        return dataclasses.replace(recipe, inputs=inputs)

    def is_craftable(self, name: str) -> bool:
        return name in self.recipes or name in self.tag_recipes

    def recipes_for(self, name: str) -> list[Recipe]:
        return self.recipes.get(name) or self.tag_recipes.get(name) or []

    def depth(self, name: str) -> int:
        """Minimum crafting depth: 0 for fetched items, else min over recipes of 1 + the deepest input."""
        if name not in self._depth:
            recipes = self.recipes_for(name)
            self._depth[name] = min((1 + max(self.depth(i.name) for i in r.inputs) for r in recipes), default=0)
        return self._depth[name]

    def goals(self) -> list[str]:
        """Every craftable item, sorted by (depth, item id): task index i names the same goal everywhere.
        (AgentGym sorts by depth only, so its ties follow the file system's listing order.)"""
        return sorted(self.recipes, key=lambda item: (self.depth(item), item))

    def recipe_tree(self, goal: str) -> list[Recipe]:
        """Every recipe that can take part in crafting `goal`, all alternatives and tag members included."""
        found: dict[Recipe, None] = {}

        def visit(name: str, path: frozenset) -> None:
            if name in path:
                return
            for recipe in self.recipes_for(name):
                found[recipe] = None
                for ingredient in recipe.inputs:
                    visit(ingredient.name, path | {name})

        visit(goal, frozenset())
        return list(found)

    def variants(self, tag: str) -> list[str]:
        """The craftable items carrying `tag`, easiest first."""
        return sorted((item for item, t in self.tag_of.items() if t == tag and item in self.recipes),
                      key=lambda item: (self.depth(item), item))


class TextCraft:
    """TextCraft (AgentGym `TextCraftEnv` behind its `TextCraftEnvClient`): observations, error messages
    and the 0/1 reward of the original.

    reset(i) -> "Crafting commands:\\n<recipes>\\n\\nGoal: craft <goal>."  (the goal's recipe tree plus up
    to 10 distractor recipes sharing its ingredients, shuffled with a seed derived from i).
    step(response) reads the action as the AgentGym client `client` does (`client_action`): the 2024 one
    (Agent-R's) or the 2025 one. Then the server's rules:
      get N x                 -> "Got N x", or "Could not find x" (x craftable, a tag, or unknown)
      craft N x using k a, .. -> "Crafted <n> minecraft:x" when the inputs match one recipe of x exactly and
                                 are in the inventory (N is not checked: the recipe says how many), else
                                 "Could not find enough items to craft minecraft:x" /
                                 "Could not find a valid recipe for ..." / "Wrong item format: .."
      inventory               -> "Inventory: [item] (n) ..." or "Inventory: You are not carrying anything."
      anything else           -> "Could not execute <action>"
    Reward 1 and done when the goal item is obtained; otherwise 0 and not done (no failure state).
    """

    MAX_DISTRACTORS = 10
    ERROR_PREFIXES = ("Could not", "Wrong item format", "Error:")

    def __init__(self, rules: CraftingRules, instruction: str = TEXTCRAFT_INSTRUCTION_2024, seed: int = 42,
                 client: str = "2024"):
        self.rules, self.instruction, self.seed, self.client = rules, instruction, seed, client
        self.goal_list = rules.goals()
        self.goal: str | None = None
        self.inventory: dict[str, int] = {}

    @classmethod
    def from_source(cls, recipes: str, instruction: str | None = None, client: str = "2024") -> "TextCraft":
        """`recipes`: a folder of recipe JSON files, or "synthetic" (the small CPU set below); `instruction`
        None: the client's."""
        jsons = synthetic_recipes() if recipes == "synthetic" else load_recipe_folder(recipes)
        return cls(CraftingRules(jsons), instruction or TEXTCRAFT_INSTRUCTIONS[client], client=client)

    def num_tasks(self) -> int:
        return len(self.goal_list)

    @classmethod
    def is_error(cls, observation: str) -> bool:
        """Whether an observation is one of the environment's refusals."""
        return observation.startswith(cls.ERROR_PREFIXES)

    def reset(self, task_index: int) -> str:
        self.inventory = {}
        self.goal = self.goal_list[task_index % len(self.goal_list)]
        rng = random.Random(f"{self.seed}-{task_index}")
        tree = self.rules.recipe_tree(self.goal)
        shown = {r.text for r in tree}
        distractors = set()
        for recipe in tree:
            for ingredient in recipe.inputs:
                uses = sorted({r.text for r in self.rules.uses.get(ingredient.name, [])})
                distractors.update(rng.sample(uses, min(len(uses), self.MAX_DISTRACTORS)))
        distractors = sorted(distractors - shown)
        lines = sorted(shown) + rng.sample(distractors, min(len(distractors), self.MAX_DISTRACTORS))
        rng.shuffle(lines)
        return "Crafting commands:\n{}\n\nGoal: craft {}.".format("\n".join(lines), display_name(self.goal))

    def step(self, response: str) -> tuple[str, float, bool]:
        action = client_action(response, self.client)
        if action is None:
            return ONE_ACTION_ONLY, 0.0, False
        try:
            return self._execute(action)
        except _ActionFailed as failure:
            return str(failure), 0.0, False

    def _execute(self, action: str) -> tuple[str, float, bool]:
        if match := re.match(r"craft (.*) using (.*)", action):
            return self._craft(match.group(1), match.group(2))
        if match := re.match(r"get ([0-9]+) (.*)", action):
            amount, name = int(match.group(1)), match.group(2)
            item = item_id(name)
            if self.rules.is_craftable(item) or item in self.rules.tags or item not in self.rules.items:
                raise _ActionFailed(f"Could not find {name}")
            self.inventory[item] = self.inventory.get(item, 0) + amount
            return f"Got {amount} {name}", *self._goal_reached(item)
        if re.match(r"inventory", action):
            if not self.inventory:
                return "Inventory: You are not carrying anything.", 0.0, False
            return "Inventory: " + "".join(f"[{display_name(i)}] ({n}) " for i, n in self.inventory.items()), 0.0, False
        raise _ActionFailed(f"Could not execute {action}")

    def _craft(self, target: str, inputs_text: str) -> tuple[str, float, bool]:
        if match := re.match(r"([0-9]+) (.*)", target):
            target, wanted = match.group(2), int(match.group(1))
        else:
            wanted = 1
        output = item_id(target)
        output_is_tag = output in self.rules.tags
        given = []
        for part in inputs_text.split(","):
            if not (match := re.match(r"([0-9]+) (.*)", part.strip())):
                raise _ActionFailed(f"Wrong item format: {part.strip()}")
            name = item_id(match.group(2))
            count = int(match.group(1))
            given.append(_GivenInput(None, name, count) if name in self.rules.tags else _GivenInput(name, None, count))
        output_id = None if output_is_tag else output
        for name, _, count in given:
            if name is None or self.inventory.get(name, 0) < count:
                raise _ActionFailed(f"Could not find enough items to craft {output_id}")
        recipe = self._matching_recipe(output_id, given)
        if recipe is None:
            # the server prints its dataclass: ItemTagWithCount(item_tag=ItemTag(tag=.., item_id=..), count=..)
            tag, item = (repr(output), None) if output_is_tag else (None, repr(output))
            raise _ActionFailed(f"Could not find a valid recipe for ItemTagWithCount(item_tag=ItemTag(tag={tag}, "
                                f"item_id={item}), count={wanted})")
        for name, _, count in given:
            self.inventory[name] -= count
            if self.inventory[name] == 0:
                del self.inventory[name]
        self.inventory[recipe.output] = self.inventory.get(recipe.output, 0) + recipe.count
        return f"Crafted {recipe.count} {recipe.output}", *self._goal_reached(recipe.output)

    def _matching_recipe(self, output: str | None, given: list[_GivenInput]) -> Recipe | None:
        """The recipe of `output` whose inputs are exactly `given` (counts included); a tag input of the
        recipe is matched by the tag itself or by any item carrying it."""
        def fits(ingredient: Ingredient, item: str | None, tag: str | None) -> bool:
            if ingredient.is_tag:
                return tag == ingredient.name or self.rules.tag_of.get(item) == ingredient.name
            return item == ingredient.name

        for recipe in self.rules.recipes.get(output, []):
            left = list(given)
            for ingredient in recipe.inputs:
                match = next((g for g in left if fits(ingredient, g.item, g.tag)), None)
                if match is None or match.count != ingredient.count:
                    break
                left.remove(match)
            else:
                if not left:
                    return recipe
        return None

    def _goal_reached(self, item: str) -> tuple[float, bool]:
        return (1.0, True) if item == self.goal else (0.0, False)


class _ActionFailed(Exception):
    """An action the rules refuse; its message is the observation."""


ONE_ACTION_ONLY = "Error: Only one 'Action' is allowed per response. Please adjust your response."


def client_action(response: str, client: str) -> str | None:
    """The action AgentGym's TextCraft client sends to the server for a model turn; None when it refuses the turn.

    "2024" (the first release, f434743, which Agent-R ran on): the text after the last "Action:" (the whole turn
    when there is none), later lines included, cut at "Instruction:".
    "2025" (the update 640f8bc): the text after "Action:" up to the line end; a turn with more than one "Action:"
    is refused with ONE_ACTION_ONLY.
    Both then drop every character but letters, digits, "," and space (a newline too, so a later line is glued
    to the action) and collapse runs of spaces."""
    if client == "2024":
        action = response.split("Instruction:")[0].split("Action:")[-1]
    else:
        actions = re.findall(r"Action:\s*(.*?)(?=\n|$)", response, re.DOTALL)
        if len(actions) > 1:
            return None
        action = actions[-1] if actions else ""
    return " ".join(re.sub(r"[^A-Za-z0-9, ]+", "", action).split())


def synthetic_recipes() -> dict[str, dict]:
    """A small TextCraft world for the CPU default, written as Minecraft recipe JSONs (so it goes through
    the same loader as the real files): 18 fetchable items, 44 craftable ones of depth 1 to 4, a tag
    (`planks`: oak or birch) and shared ingredients, hence distractor recipes. Each recipe makes exactly
    what the recipes using it need, so an expert plan crafts every intermediate once (4 to 9 actions).
    """
    recipes: dict[str, dict] = {}

    def add(output: str, count: int, inputs: list[tuple[int, str]], group: str | None = None) -> None:
        ingredients = [{"tag": item_id(name)} if name == "planks" else {"item": item_id(name)}
                       for n, name in inputs for _ in range(n)]
        recipe = {"type": "minecraft:crafting_shapeless", "ingredients": ingredients,
                  "result": {"item": item_id(output), "count": count}}
        recipes[f"{output.replace(' ', '_')}.json"] = recipe | ({"group": group} if group else {})

    for wood in ("oak", "birch"):
        add(f"{wood} planks", 2, [(1, f"{wood} logs")], group="planks")
    add("stick", 2, [(2, "planks")])
    add("torch", 1, [(2, "stick"), (1, "coal")])
    for metal in ("iron", "gold", "copper", "tin", "silver"):
        add(f"{metal} ingot", 2, [(3, f"{metal} nugget")])
        add(f"{metal} bars", 1, [(2, f"{metal} ingot")])
        add(f"{metal} gear", 1, [(2, f"{metal} ingot"), (1, "redstone")])
        add(f"{metal} sword", 1, [(2, f"{metal} ingot"), (2, "stick")])
        add(f"{metal} lantern", 1, [(2, f"{metal} ingot"), (1, "torch")])
    add("glass", 1, [(2, "sand")])
    add("glass pane", 1, [(1, "glass")])
    add("paper", 1, [(3, "sugar cane")])
    add("book", 1, [(1, "paper"), (1, "leather")])
    add("bookshelf", 1, [(2, "planks"), (1, "book")])
    add("bow", 1, [(2, "stick"), (2, "string")])
    add("arrow", 1, [(1, "flint"), (2, "stick"), (1, "feather")])
    add("fishing rod", 1, [(2, "stick"), (1, "string")])
    add("ladder", 1, [(2, "stick")])
    add("bowl", 1, [(2, "planks")])
    add("brick", 1, [(2, "clay ball")])
    add("flower pot", 1, [(1, "brick")])
    add("bone meal", 2, [(1, "bone")])
    add("white dye", 1, [(2, "bone meal")])
    add("bread", 1, [(3, "wheat")])
    return recipes


# --------------------------------------------------------------------------------------------------
# The agent's turn: ReAct, one thought and one action
# --------------------------------------------------------------------------------------------------


def react_turn(thought: str, action: str) -> str:
    """One agent turn in Agent-R's ReAct format."""
    return f"Thought: {thought}\nAction: {action}"


def action_text(response: str) -> str:
    """The action of a ReAct turn: what follows the last "Action:", up to the line end."""
    return response.split("Action:")[-1].strip().split("\n")[0].strip() if "Action:" in response else ""


# --------------------------------------------------------------------------------------------------
# The expert: a planner over the recipe graph (warm-start demonstrations and the revision test only)
# --------------------------------------------------------------------------------------------------


def expert_plan(rules: CraftingRules, goal: str) -> list[tuple[str, str]]:
    """A shortest-depth plan for `goal` from an empty inventory, as (thought, action) pairs.

    Depth-first: for each input of the easiest recipe, obtain it (fetch a base item in one `get`, or
    craft it recursively; a tag takes its easiest member), then craft as many times as needed. Items
    made in surplus are reused.
    """
    steps: list[tuple[str, str]] = []
    spare: dict[str, int] = {}

    def obtain(name: str, count: int, parent: str) -> None:
        reused = min(spare.get(name, 0), count)
        spare[name] = spare.get(name, 0) - reused
        missing = count - reused
        if missing == 0:
            return
        if not rules.is_craftable(name):
            steps.append((f"{display_name(parent)} needs {display_name(name)}.", f"get {missing} {display_name(name)}"))
            return
        recipe = min(rules.recipes_for(name), key=lambda r: max(rules.depth(i.name) for i in r.inputs))
        crafts = math.ceil(missing / recipe.count)
        chosen = []
        for ingredient in recipe.inputs:
            concrete = ingredient.name
            if ingredient.is_tag:
                members = rules.variants(ingredient.name)
                concrete = next((v for v in members if spare.get(v, 0) >= ingredient.count * crafts), members[0])
            obtain(concrete, ingredient.count * crafts, recipe.output)
            chosen.append(f"{ingredient.count} {display_name(concrete)}")
        for _ in range(crafts):
            steps.append((f"I can craft {display_name(recipe.output)}.",
                          f"craft {recipe.count} {display_name(recipe.output)} using {', '.join(chosen)}"))
        spare[recipe.output] = spare.get(recipe.output, 0) + crafts * recipe.count - missing

    obtain(goal, 1, goal)
    return steps


def noisy_expert(rules: CraftingRules, goal: str, rng: random.Random) -> tuple[list[tuple[str, str]], int]:
    """The expert plan with one mistake, and the mistake's index. The mistake is one of the two a
    beginner makes: fetching an intermediate instead of crafting it ("Could not find ...") or fetching
    too few of a base item (or the wrong one); the plan then goes on as if nothing had happened, so a
    later craft fails for want of items."""
    plan = expert_plan(rules, goal)
    fetched = sorted(i for i in rules.items if not rules.is_craftable(i) and i not in rules.tags)
    index = rng.randrange(len(plan) - 1) if len(plan) > 1 else 0  # never the final craft
    thought, action = plan[index]
    if match := re.match(r"craft (\d+) (.*) using", action):
        count, name = match.groups()
        mistake = (f"I need {name}.", f"get {count} {name}")
    else:
        count, name = re.match(r"get (\d+) (.*)", action).groups()
        if int(count) > 1:
            mistake = (thought, f"get {int(count) - 1} {name}")
        else:
            other = rng.choice([i for i in fetched if i != item_id(name)])
            mistake = (thought.replace(name, display_name(other)), f"get 1 {display_name(other)}")
    return plan[:index] + [mistake] + plan[index + 1:], index


def failed_prefix(env: TextCraft, task: int, rng: random.Random) -> list[str]:
    """The responses of an expert start that ends in a mistake: what the revision test forces the
    model through before it must recover (Table 3)."""
    env.reset(task)
    plan, index = noisy_expert(env.rules, env.goal, rng)
    return [react_turn(thought, action) for thought, action in plan[: index + 1]]
