"""Running the real command-line tools as subprocesses, from the same environment as the tests."""
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def ours(*args) -> list:
    """``multitask-nnunet ARGS`` (through the interpreter running the tests)."""
    return [sys.executable, "-m", "multitask_nnunet.cli", *map(str, args)]


def nnunet(command: str, *args) -> list:
    """A stock nnU-Net console script (nnUNetv2_train, ...) of the same environment."""
    return [str(BIN / command), *map(str, args)]


def run(cmd: list, env: dict, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
                             f"\n--- stderr\n{result.stderr[-4000:]}")
    return result
