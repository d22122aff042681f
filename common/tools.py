"""Tool calls: parsing them out of a model's text, checking them against the tools' schemas, and
running a dataset's tool code in a sandboxed child process.

Two formats are read, the two the ToolHop paper evaluates (its authors' `code/evaluation_open.py`,
`parse_qwen25` and `parse_llama31`). Qwen2.5's (its chat template, `common.models.QWEN25_CHAT_TEMPLATE`):
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
Llama-3.1's: the reply is the JSON, optionally after `<|python_tag|>` (a special token, so it is gone from
text decoded without special tokens), with the arguments under "parameters":
    {"name": "get_weather", "parameters": {"city": "Paris"}}

    parse_tool_calls(text)                     # [{"name": ..., "arguments": {...}}, ...]
    parse_assistant_turn(text)                 # content before the calls, the calls, unreadable blocks
    call_from_message(tool_call)               # a call as a chat message stores it (arguments may be a JSON string)
    invocation_errors(call, tools)             # ["tool_hallucination" | "parameter_hallucination" | "parameter_missing"]
    execute_tool(source, name, arguments)      # the text the model sees: a JSON result or an error

What `execute_tool` protects against, and what it does not
-----------------------------------------------------------
Tool code comes from a dataset (ToolHop ships 3,912 generated Python functions) and runs on the user's
machine, so each call runs in a fresh child Python process (this file, run as a script) that:

- is killed, with everything it started, when the call takes longer than `timeout` seconds (wall
  clock, interpreter start included; `RLIMIT_CPU` also ends it if the evaluation itself dies);
- may use at most `MEMORY_LIMIT_BYTES` of address space (`RLIMIT_AS`; allocating more raises
  MemoryError in the tool) and write files of at most `FILE_LIMIT_BYTES`;
- runs in a throw-away working directory (also its HOME and TMPDIR), deleted afterwards, with an
  environment that holds nothing of the user's;
- has, through a PEP 578 audit hook installed before the tool's code is read, these refused with a
  PermissionError: writing, creating, renaming or deleting anything outside that directory; reading
  anything but that directory and the Python installation (standard library, site-packages, time
  zones); starting processes (fork, exec, spawn, system, subprocess, multiprocessing); sending signals
  (os.kill, killpg, pthread_kill, and the unaudited pidfd_open); creating sockets or resolving host
  names; loading a native library or looking up a native function through ctypes; raising its own
  resource limits.

Whatever the tool does to its own process (crash, exit, hang, print), the caller gets an error string
in the ToolHop authors' format and the evaluation goes on. This is a guard against tool code that
misbehaves through ordinary library calls, by mistake or on purpose. It is *not* a security boundary:
CPython's audit hooks are documented as unable to stop code written to defeat them, and a process
running as root is not stopped by `RLIMIT_NPROC`. To evaluate tool code you do not trust at all, run
the whole evaluation inside a container or a virtual machine without network access.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MEMORY_LIMIT_BYTES = 1 << 30  # 1 GiB of address space per call; ToolHop's tools need a few MB
FILE_LIMIT_BYTES = 16 << 20  # largest file a tool may write in its working directory

_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"
REPAIR_CHARS_PER_REPLY = 20_000  # json_repair's time grows with its input: what it may read of one reply


class ToolCallParseError(ValueError):
    """The text has a tool-call block that is not a JSON object with a string "name"."""


@dataclass
class AssistantTurn:
    content: str  # the text before the first call (all of it when there is none), stripped
    calls: list[dict] = field(default_factory=list)  # {"name": str, "arguments": dict}, in order
    malformed: list[str] = field(default_factory=list)  # blocks that are no call even after JSON repair


def parse_assistant_turn(text: str) -> AssistantTurn:
    """Split a model's reply into its content and its tool calls, as the ToolHop authors do: Qwen2.5's
    `<tool_call>` blocks when the reply has one, else Llama-3.1's JSON call. The authors pick the parser by
    the model's series; here the reply tells it (a Llama-3.1 call is the whole reply, JSON with "parameters").
    Text that is not valid JSON goes to json_repair, as theirs does, but at most REPAIR_CHARS_PER_REPLY
    characters of it per reply, however many blocks the reply has, so that one reply's parse is bounded."""
    budget = _RepairBudget(REPAIR_CHARS_PER_REPLY)
    if "<tool_call>" in text:
        return _parse_qwen25(text, budget)
    return _parse_llama31(text, budget)


def _parse_qwen25(text: str, budget: _RepairBudget) -> AssistantTurn:
    """Each `<tool_call>` block read with `json_repair` (a missing brace or single quotes are forgiven), a
    block left open at the end of the text too, and `arguments` given as a JSON string decoded. A block
    that still is no {"name": str, "arguments": dict} object is kept in `malformed` and not called."""
    turn = AssistantTurn(content=text[: text.find("<tool_call>")].strip())
    for block in _TOOL_CALL.findall(text):
        call = _read_json(block, budget)
        arguments = call.get("arguments", {}) if isinstance(call, dict) else None
        if isinstance(arguments, str):  # some models emit the arguments as a JSON string
            arguments = _read_json(arguments, budget) if arguments.strip() else {}
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
            turn.malformed.append(block.strip())
            continue
        turn.calls.append({"name": call["name"], "arguments": arguments})
    return turn


def _parse_llama31(text: str, budget: _RepairBudget) -> AssistantTurn:
    """The JSON after `<|python_tag|>`, else the whole reply read as JSON (json_repair also finds an object
    inside prose, as in the authors' `parse_llama31`): a call is {"name": str, "parameters": dict or JSON
    string}. Only the first call is kept (Llama-3.1 makes one call per turn; the authors keep the first).
    A reply that is no call is content; what follows `<|python_tag|>` and is no call is malformed."""
    tagged = text.find(_PYTHON_TAG)
    payload = (text[tagged + len(_PYTHON_TAG):] if tagged >= 0 else text).strip()
    parsed = _read_json(payload, budget) if payload else None
    candidates = parsed if isinstance(parsed, list) else [parsed]
    calls = [call for call in (_llama31_call(candidate, budget) for candidate in candidates) if call]
    before = text[:tagged].strip() if tagged >= 0 else ""
    if calls:
        return AssistantTurn(content=before, calls=calls[:1])
    if tagged >= 0:
        return AssistantTurn(content=before, malformed=[payload])
    return AssistantTurn(content=text.strip())


def _llama31_call(candidate, budget: _RepairBudget) -> dict | None:
    """{"name": str, "parameters": dict or JSON string} as {"name", "arguments": dict}; None if it is not one."""
    if not isinstance(candidate, dict) or not isinstance(candidate.get("name"), str):
        return None
    arguments = candidate.get("parameters")
    if isinstance(arguments, str):
        arguments = _read_json(arguments, budget) if arguments.strip() else {}
    return {"name": candidate["name"], "arguments": arguments} if isinstance(arguments, dict) else None


class _RepairBudget:
    """How many more characters json_repair may read for one reply."""

    def __init__(self, chars: int):
        self.chars_left = chars

    def spend(self, text: str) -> bool:
        if len(text) > self.chars_left:
            return False
        self.chars_left -= len(text)
        return True


def _read_json(text: str, budget: _RepairBudget):
    """`text` as JSON; if it is not valid JSON, as `json_repair` reads it (the ToolHop authors' parser)
    while the reply's budget lasts; None if neither can."""
    import json_repair

    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    if not budget.spend(text):
        return None
    try:
        return json_repair.loads(text)
    except (ValueError, RecursionError):  # deeply nested garbage
        return None


def parse_tool_calls(text: str) -> list[dict]:
    """Every tool call of `text` (see `parse_assistant_turn`) as {"name": str, "arguments": dict}, in order.

    Raises ToolCallParseError on a block that cannot be read as a call even after JSON repair; text
    without any call gives [].
    """
    turn = parse_assistant_turn(text)
    if turn.malformed:
        raise ToolCallParseError(f"tool call is not a JSON object with a string \"name\": {turn.malformed[0][:200]!r}")
    return turn.calls


def call_from_message(tool_call) -> dict | None:
    """A tool call as a chat message stores it, `{"type": "function", "function": {"name", "arguments"}}`,
    as {"name": str, "arguments": dict}; None when it is no such call. OpenAI's format, in which the ToolHop
    authors save their conversations, holds `arguments` as a JSON string; it is decoded here."""
    function = tool_call.get("function", tool_call) if isinstance(tool_call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return None
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        arguments = _read_json(arguments, _RepairBudget(REPAIR_CHARS_PER_REPLY)) if arguments.strip() else {}
    return {"name": function["name"], "arguments": arguments} if isinstance(arguments, dict) else None


def invocation_errors(call: dict, tools: list[dict]) -> list[str]:
    """The ToolHop paper's invocation errors (§4.1) of one call against the offered tools' schemas:
    a tool that was not offered, an argument the schema does not have, a required argument left out.

    `tools` are OpenAI-style function documents, `{"name", "description", "parameters"}`, with or
    without the `{"type": "function", "function": ...}` wrapper. When two documents share a name, the
    last one is read: it describes the definition that runs (see `find_tool_source`).
    """
    schemas = {tool.get("function", tool)["name"]: tool.get("function", tool) for tool in tools}  # the last wins
    if call["name"] not in schemas:
        return ["tool_hallucination"]
    parameters = schemas[call["name"]].get("parameters") or {}
    known, required = parameters.get("properties") or {}, parameters.get("required") or []
    errors = []
    if any(argument not in known for argument in call["arguments"]):
        errors.append("parameter_hallucination")
    if any(argument not in call["arguments"] for argument in required):
        errors.append("parameter_missing")
    return errors


def find_tool_source(functions: list[str], name: str) -> str:
    """The code that runs for a call of `name`, as the ToolHop authors build it (`code/evaluation_open.py`,
    `get_feedback`): every source in `functions` whose text between the first `def` and the next `(` is
    `name`, in order, as one program. Several rows define two tools with the same name; their sources run
    one after the other, so the last definition is the function called. "" when no source defines it
    (the call then fails with the authors' NameError text)."""
    return "\n\n".join(source for source in functions
                        if "def" in source and source.split("def", 1)[1].split("(", 1)[0].strip() == name)


def tool_error(name: str, message: str) -> str:
    """What the model sees when a call fails: the ToolHop authors' text, their spelling kept."""
    return f"an error occured when call {name}: {message}"


def execute_tool(source: str, name: str, arguments: dict, timeout: float = 10.0) -> str:
    """Run `source` (a whole tool file: imports, the function, its example usage) in a sandboxed child
    process, then call `name(**arguments)` there.

    Returns `json.dumps(result, ensure_ascii=False)` on success and `tool_error(name, reason)` on any
    failure: the function is not defined by `source`, a bad or missing argument, an exception raised by
    the tool, a result that is not JSON-serialisable, a time-out, the memory limit, a refused action.
    The module docstring says what the sandbox does and does not protect against.
    """
    import subprocess  # here, not at the top: the child (this file run as a script) has no use for it

    request = json.dumps({"source": source, "name": name, "arguments": arguments, "timeout": timeout})
    with tempfile.TemporaryDirectory(prefix="tool-", ignore_cleanup_errors=True) as workdir:
        environment = {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
                       "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        child = subprocess.Popen(
            [sys.executable, "-I", "-B", str(Path(__file__).resolve()), "--run-one-tool-call"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=workdir, env=environment, start_new_session=True,  # its own process group, killed as one
        )
        try:
            output, _ = child.communicate(request.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(child.pid)
            child.communicate()
            return tool_error(name, f"{name} timed out after {timeout:g} seconds")
        finally:
            _kill_group(child.pid)  # anything the tool left running
    try:
        reply = json.loads(output)
        return str(reply["content"]) if "content" in reply else tool_error(name, str(reply["error"]))
    except (ValueError, TypeError, KeyError):  # no reply, or not the one `_run_one_tool_call` writes
        if child.returncode < 0:
            return tool_error(name, f"the tool's process was killed by {signal.Signals(-child.returncode).name}")
        return tool_error(name, f"the tool's process exited with code {child.returncode} without a result")


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------------------------------
# The child side of `execute_tool`: this file run as a script, one call per process.
# --------------------------------------------------------------------------------------------------


def _run_one_tool_call() -> None:
    request = json.loads(sys.stdin.buffer.read())
    answer = os.fdopen(os.dup(1), "w", encoding="utf-8")  # the reply goes here; the tool's prints go nowhere
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    _limit_resources(request["timeout"])
    _refuse_escapes(workdir=os.getcwd())
    name = request["name"]
    try:
        namespace = {"__name__": "__main__"}
        exec(compile(request["source"], "<tool>", "exec"), namespace)
        if name not in namespace:
            raise NameError(f"name '{name}' is not defined")
        reply = {"content": json.dumps(namespace[name](**request["arguments"]), ensure_ascii=False)}
    except BaseException as error:  # SystemExit and KeyboardInterrupt too: every failure is reported
        reply = {"error": str(error) or type(error).__name__}
    answer.write(json.dumps(reply))
    answer.flush()
    os._exit(0)  # skip atexit handlers and threads the tool may have left behind


def _limit_resources(timeout: float) -> None:
    import resource

    cpu_seconds = math.ceil(timeout) + 1
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT_BYTES, FILE_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no new processes (the kernel exempts root)


_REFUSED_EVENTS = {
    **dict.fromkeys(["os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "os.system",
                     "subprocess.Popen"], "starting a process"),
    **dict.fromkeys(["os.kill", "os.killpg", "signal.pthread_kill"], "sending a signal"),
    **dict.fromkeys(["socket.__new__", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                     "socket.gethostbyaddr"], "network access"),
    **dict.fromkeys(["ctypes.dlsym", "ctypes.cdata"], "calling native code"),
    **dict.fromkeys(["resource.setrlimit", "resource.prlimit"], "changing resource limits"),
    **dict.fromkeys(["os.symlink", "os.link"], "creating links"),
}
_PATH_CHANGES = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.chflags",
                 "os.truncate", "os.utime", "os.mkfifo", "os.mknod"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _refuse_escapes(workdir: str) -> None:
    import sysconfig

    workdir = os.path.realpath(workdir)
    python_dirs = [*sys.path, sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                   *(sysconfig.get_config_var("TZPATH") or "").split(os.pathsep)]
    readable = {workdir, *(os.path.realpath(p) for p in python_dirs if p)}
    devices = {os.devnull, "/dev/urandom", "/dev/zero"}

    def inside(path, roots) -> bool:
        real = os.path.realpath(os.fsdecode(path))
        return real in devices or any(real == root or real.startswith(root + os.sep) for root in roots)

    def guard(event: str, args: tuple) -> None:
        if event in _REFUSED_EVENTS:
            raise PermissionError(f"{event}: {_REFUSED_EVENTS[event]} is not allowed for a tool")
        if event == "import" and args[0] == "_posixsubprocess" and args[0] not in sys.modules:
            raise PermissionError("importing a fresh _posixsubprocess is not allowed for a tool")
        if event == "ctypes.dlopen" and args[0] is not None:  # numpy imports ctypes, which opens only None
            raise PermissionError(f"loading the native library {args[0]} is not allowed for a tool")
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):  # an already open descriptor
                return
            writes = bool((flags or 0) & _WRITE_FLAGS) or any(c in (mode or "") for c in "wax+")
            if not inside(path, [workdir] if writes else readable) or (
                    os.path.isdir(path) and not inside(path, [workdir])):  # a directory fd would reach around the check
                raise PermissionError(f"{'writing' if writes else 'reading'} {os.fsdecode(path)} is not allowed for a tool")
        elif event in ("os.listdir", "os.scandir"):
            path = args[0] if args and args[0] is not None else os.getcwd()
            if not isinstance(path, int) and not inside(path, readable):
                raise PermissionError(f"listing {os.fsdecode(path)} is not allowed for a tool")
        elif event in _PATH_CHANGES:
            paths = args[:2] if event == "os.rename" else args[:1]
            for path in paths:
                if not isinstance(path, int) and not inside(path, [workdir]):
                    raise PermissionError(f"{event} on {os.fsdecode(path)} is not allowed for a tool")

    # Starting a process through _posixsubprocess and signalling through a process file descriptor raise
    # no audit event: replace those functions (the import check above keeps a fresh copy from coming back).
    import _posixsubprocess
    import posix

    _posixsubprocess.fork_exec = _refused("starting a process")
    os.pidfd_open = posix.pidfd_open = _refused("sending a signal")
    sys.addaudithook(guard)


def _refused(action: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{action} is not allowed for a tool")

    return refuse


if __name__ == "__main__" and sys.argv[1:] == ["--run-one-tool-call"]:
    _run_one_tool_call()
