"""Running the real command-line tools as subprocesses, from the same environment as the tests."""
import os
import signal
import subprocess
import sys
import time
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


def kill_when(cmd: list, env: dict, condition, timeout: float = 600):
    """Start ``cmd``, poll ``condition()`` (every 0.5 ms) and SIGKILL the process as soon as it returns something
    true, which is returned (re-checked after the kill, so it is true of what the killed process left). ``None``
    if the command ended first or what was seen was gone by the time the process was dead."""
    process = subprocess.Popen(cmd, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if condition():
                process.send_signal(signal.SIGKILL)
                process.wait()
                return condition() or None
            time.sleep(0.0005)
        return None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
