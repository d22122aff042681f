"""Running `tests/multiprocess/launch.py` under torchrun from a test, and reading what each rank saw."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
LAUNCH = ROOT / "tests" / "multiprocess" / "launch.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_environment() -> dict:
    """What `accelerate launch --config_file configs/fsdp.yaml` puts in the environment (its FSDP settings),
    mixed precision off (bf16 autocast on CPU would only be slow)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    parsed = launch_command_parser().parse_args(["--config_file", str(ROOT / "configs" / "fsdp.yaml"),
                                                 "--num_processes", "2", "--mixed_precision", "no", str(LAUNCH)])
    parsed, _, _ = _validate_launch_command(parsed)
    return {k: v for k, v in prepare_multi_gpu_env(parsed).items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}


def launch(out_dir: Path, jobs: list[tuple], processes: int = 2, fsdp2: bool = False, stand_in_vllm: bool = False,
           expect_failure: bool = False) -> dict[str, list[dict]]:
    """Run (name, scenario, args[, observe]) jobs in one torchrun launch (see launch.py); returns each job's
    observations, one dict a rank."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FSDP_", "ACCELERATE_", "TEST_"))}
    env |= {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT)}
    if fsdp2:
        env |= fsdp_environment() | {"TEST_FSDP2": "1"}
    if stand_in_vllm:
        env["TEST_STAND_IN_VLLM"] = "1"
    spec = json.dumps([{"name": job[0], "scenario": job[1], "args": [str(a) for a in job[2]],
                        "observe": job[3] if len(job) > 3 else {}} for job in jobs])
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
               f"--master-port={free_port()}", str(LAUNCH), str(out_dir), spec]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    if expect_failure:
        assert result.returncode != 0, "the run was meant to be killed"
        return {}
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return {job[0]: [json.loads((out_dir / job[0] / f"rank-{r}.json").read_text()) for r in range(processes)]
            for job in jobs}
