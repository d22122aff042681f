"""Tool calls: lenient parsing, invocation-error classes, and the sandboxed executor.

The hostile cases are real: each runs its code in `execute_tool`'s child process and checks that the
harm did not happen (the file was not written, this test process was not killed) and that the call
came back as an error in the ToolHop authors' format.
"""

import json
import os
import tempfile
from pathlib import Path

import pytest

from common.tools import (
    ToolCallParseError,
    call_from_message,
    execute_tool,
    find_tool_source,
    invocation_errors,
    parse_assistant_turn,
    parse_tool_calls,
)

ADD = '''import json

def add(a: int, b: int = 0):
    """Adds two numbers."""
    return {"sum": a + b, "text": "ñ"}

# Example usage
print(add(1, 2))
'''
ADD_SCHEMA = {"name": "add", "description": "Adds.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a"]}}


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


def test_parse_reads_content_and_every_call():
    text = ('Let me look.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 2, \\"b\\": 3}"}\n</tool_call>')
    turn = parse_assistant_turn(text)
    assert turn.content == "Let me look."
    assert turn.calls == [{"name": "add", "arguments": {"a": 1}}, {"name": "add", "arguments": {"a": 2, "b": 3}}]
    assert parse_tool_calls(text) == turn.calls
    assert parse_assistant_turn("just an answer <answer>4</answer> ").content == "just an answer <answer>4</answer>"
    assert parse_tool_calls("no calls here") == []


@pytest.mark.parametrize("block", [
    '{"name": "add", "arguments": {"a": 1}',  # a brace missing
    "{'name': 'add', 'arguments': {'a': 1}}",  # single quotes
    '{"name": "add", "arguments": {"a": 1}}\n',  # left open at the end of the text (no </tool_call>)
])
def test_parse_repairs_json_as_the_toolhop_authors_do(block):
    assert parse_tool_calls(f"<tool_call>\n{block}") == [{"name": "add", "arguments": {"a": 1}}]


@pytest.mark.parametrize("block", ["not json at all", '{"arguments": {"a": 1}}', '{"name": "add", "arguments": [1]}', "",
                                   "[" * 100_000, "{" + "x" * 100_000])  # the last two: deep and long garbage
def test_unreadable_calls_are_kept_aside_not_called(block):
    text = f'<tool_call>{block}</tool_call><tool_call>{{"name": "add", "arguments": {{}}}}</tool_call>'
    turn = parse_assistant_turn(text)
    assert turn.calls == [{"name": "add", "arguments": {}}] and len(turn.malformed) == 1
    with pytest.raises(ToolCallParseError):
        parse_tool_calls(text)


@pytest.mark.parametrize("text, content, calls", [
    ('{"name": "add", "parameters": {"a": 1}}', "", [{"name": "add", "arguments": {"a": 1}}]),  # decoded without specials
    ('<|python_tag|>{"name": "add", "parameters": {"a": 1}}', "", [{"name": "add", "arguments": {"a": 1}}]),
    ('Let me add.<|python_tag|>{"name": "add", "parameters": "{\\"a\\": 2}"}', "Let me add.",
     [{"name": "add", "arguments": {"a": 2}}]),  # parameters as a JSON string
    ('{"name": "add", "parameters": {"a": 1}', "", [{"name": "add", "arguments": {"a": 1}}]),  # a brace missing
    ('[{"name": "add", "parameters": {"a": 1}}, {"name": "mul", "parameters": {}}]', "",
     [{"name": "add", "arguments": {"a": 1}}]),  # one call per turn: the first
    ('Sure. {"name": "add", "parameters": {"a": 1}}', "", [{"name": "add", "arguments": {"a": 1}}]),  # inside prose
    ("The sum is <answer>4</answer>", "The sum is <answer>4</answer>", []),
    ('{"answer": 4}', '{"answer": 4}', []),  # JSON, but no call
])
def test_llama31_calls_are_read_as_the_toolhop_authors_read_them(text, content, calls):
    turn = parse_assistant_turn(text)
    assert (turn.content, turn.calls, turn.malformed) == (content, calls, [])


def test_llama31_python_tag_followed_by_no_json_call_is_malformed():
    turn = parse_assistant_turn('Searching.<|python_tag|>brave_search.call(query="Firefly")')
    assert turn.content == "Searching." and turn.calls == [] and turn.malformed == ['brave_search.call(query="Firefly")']


def test_json_repair_reads_a_bounded_number_of_characters_per_reply_not_per_block(monkeypatch):
    """json_repair's time grows with its input, so a reply of many long broken blocks must not multiply it."""
    import json_repair

    from common import tools

    read, repair = [], json_repair.loads
    monkeypatch.setattr(json_repair, "loads", lambda text, *args, **kwargs: read.append(len(text)) or repair(text))
    block = "{'name': 'add', 'arguments': {'a': 1}}" + " " * 12_000  # single quotes: only json_repair reads it
    turn = parse_assistant_turn(f"<tool_call>{block}</tool_call>" * 5)
    assert read == [len(block)] and tools.REPAIR_CHARS_PER_REPLY < 2 * len(block)
    assert turn.calls == [{"name": "add", "arguments": {"a": 1}}] and len(turn.malformed) == 4
    read.clear()
    assert parse_assistant_turn(f"<tool_call>{block}</tool_call>").calls == turn.calls  # the next reply has its own


def test_invocation_errors_follow_the_schema():
    tools = [{"type": "function", "function": ADD_SCHEMA}]
    assert invocation_errors({"name": "add", "arguments": {"a": 1, "b": 2}}, tools) == []
    assert invocation_errors({"name": "subtract", "arguments": {"a": 1}}, tools) == ["tool_hallucination"]
    assert invocation_errors({"name": "add", "arguments": {"a": 1, "c": 2}}, [ADD_SCHEMA]) == ["parameter_hallucination"]
    assert invocation_errors({"name": "add", "arguments": {"b": 2}}, tools) == ["parameter_missing"]
    assert invocation_errors({"name": "add", "arguments": {"c": 2}}, tools) == ["parameter_hallucination",
                                                                                "parameter_missing"]


def test_calls_stored_in_messages_are_read_whether_arguments_are_a_dict_or_a_json_string():
    ours = {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    openai = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    assert call_from_message(ours) == call_from_message(openai) == {"name": "add", "arguments": {"a": 1}}
    assert call_from_message({"function": {"name": "add", "arguments": ""}}) == {"name": "add", "arguments": {}}
    assert call_from_message({"function": {"name": "add", "arguments": "[1]"}}) is None
    assert call_from_message({"function": {"arguments": "{}"}}) is None


def test_find_tool_source_matches_the_name_after_def():
    other = "def add_more(x):\n    return x\n"
    assert find_tool_source([other, ADD], "add") == ADD
    assert find_tool_source([other, ADD], "mul") == ""
    assert execute_tool(find_tool_source([other], "mul"), "mul", {}) == "an error occured when call mul: name 'mul' is not defined"


def test_two_tools_with_one_name_run_and_are_checked_as_the_last_definition():
    """ToolHop's authors exec every source defining the name, in order: the later definition is called."""
    earlier = "def lookup(name, year=None):\n    return ['earlier', name]\n"
    later = "def lookup(name, country=None):\n    return ['later', name]\n\nprint(lookup('example usage'))\n"
    source = find_tool_source([earlier, ADD, later], "lookup")
    assert execute_tool(source, "lookup", {"name": "Ada", "country": "UK"}) == '["later", "Ada"]'
    assert execute_tool(source, "lookup", {"name": "Ada", "year": 1815}) == (
        "an error occured when call lookup: lookup() got an unexpected keyword argument 'year'")
    schemas = [{"name": "lookup", "parameters": {"type": "object", "required": ["name"],
                                                 "properties": {"name": {}, key: {}}}} for key in ("year", "country")]
    assert invocation_errors({"name": "lookup", "arguments": {"name": "Ada", "country": "UK"}}, schemas) == []
    assert invocation_errors({"name": "lookup", "arguments": {"name": "Ada", "year": 1815}}, schemas) == [
        "parameter_hallucination"]


# --------------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------------


def test_a_tool_runs_and_its_result_comes_back_as_json():
    assert execute_tool(ADD, "add", {"a": 2, "b": 3}) == json.dumps({"sum": 5, "text": "ñ"}, ensure_ascii=False)


@pytest.mark.parametrize("name, arguments, expected", [
    ("add", {"b": 3}, "an error occured when call add: add() missing 1 required positional argument: 'a'"),
    ("add", {"a": 1, "c": 3}, "an error occured when call add: add() got an unexpected keyword argument 'c'"),
    ("sub", {"a": 1}, "an error occured when call sub: name 'sub' is not defined"),
])
def test_bad_calls_get_the_authors_error_text(name, arguments, expected):
    assert execute_tool(ADD, name, arguments) == expected


def test_errors_inside_the_tool_are_reported_too():
    raising = "def f(x):\n    raise ValueError(f'no record for {x}')\n"
    assert execute_tool(raising, "f", {"x": "Bob"}) == "an error occured when call f: no record for Bob"
    unserialisable = "def f():\n    return {1, 2}\n"
    assert execute_tool(unserialisable, "f", {}) == "an error occured when call f: Object of type set is not JSON serializable"


def test_a_tool_writes_only_inside_its_own_throw_away_directory():
    source = "import os\ndef f():\n    open('notes.txt', 'w').write('hi')\n    return [open('notes.txt').read(), os.getcwd()]\n"
    content, workdir = json.loads(execute_tool(source, "f", {}))
    assert content == "hi" and not os.path.exists(workdir)


def hostile_cases(tmp_path):
    outside = tmp_path / "escaped.txt"
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's data")
    return {
        "infinite loop": ("def f():\n    while True:\n        pass\n", "timed out after 1 second"),
        "sleeps forever": ("import time\ndef f():\n    time.sleep(10**6)\n", "timed out after 1 second"),
        "unbounded allocation": ("def f():\n    kept = []\n    while True:\n        kept.append(bytes(10**8))\n",
                                 "MemoryError"),
        "fork bomb": ("import os\ndef f():\n    while True:\n        os.fork()\n", "starting a process is not allowed"),
        "subprocess": ("import subprocess\ndef f():\n    subprocess.run(['rm', '-rf', '/tmp/nothing'])\n",
                       "starting a process is not allowed"),
        "os.system": ("import os\ndef f():\n    os.system('true')\n", "starting a process is not allowed"),
        "writes outside its directory": (f"def f():\n    open({str(outside)!r}, 'w').write('x')\n", "is not allowed"),
        "climbs out of its directory": ("import os\ndef f():\n    os.chdir('..')\n    open('escaped-by-a-tool.txt', 'w')\n",
                                        "is not allowed"),
        "deletes the user's file": (f"import os\ndef f():\n    os.remove({str(secret)!r})\n", "is not allowed"),
        "reads the user's file": (f"def f():\n    return open({str(secret)!r}).read()\n", "is not allowed"),
        "opens a socket": ("import socket\ndef f():\n    socket.create_connection(('example.com', 80))\n",
                           "network access is not allowed"),
        "kills its parent": ("import os, signal\ndef f():\n    os.kill(os.getppid(), signal.SIGKILL)\n",
                             "sending a signal is not allowed"),
        "kills its parent by pidfd": ("import os, signal\ndef f():\n    signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)\n",
                                      "sending a signal is not allowed"),
        "calls native code": ("import ctypes\ndef f():\n    ctypes.CDLL(None).kill(0, 9)\n", "native code is not allowed"),
        "exits without a result": ("import os\ndef f():\n    os._exit(3)\n", "exited with code 3 without a result"),
    }


def test_hostile_tool_code_is_contained_and_the_next_call_still_works(tmp_path):
    for case, (source, expected) in hostile_cases(tmp_path).items():
        text = execute_tool(source, "f", {}, timeout=1.0)
        assert text.startswith("an error occured when call f: ") and expected in text, (case, text)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (Path(tempfile.gettempdir()) / "escaped-by-a-tool.txt").exists()
    assert (tmp_path / "secret.txt").read_text() == "the user's data"
    assert execute_tool(ADD, "add", {"a": 1}) == '{"sum": 1, "text": "ñ"}'
