"""Running the real command-line tools as subprocesses, from the same environment as the tests."""
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def ours(*args) -> list:
    """``multitask-nnunet ARGS`` (through the interpreter running the tests)."""
    return [sys.executable, "-m", "multitask_nnunet.cli", *map(str, args)]


def nnunet(command: str, *args) -> list:
    """A stock nnU-Net console script (nnUNetv2_train, ...) of the same environment."""
    return [str(BIN / command), *map(str, args)]


def _checked(result: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, result.args))} exited {result.returncode}\n--- stdout\n"
                             f"{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")
    return result


def run(cmd: list, env: dict, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    return _checked(result, check)


class Started:
    """A command started in the background (its output in temporary files, so it never blocks on a full pipe);
    ``result()`` waits for it and returns what ``run`` would have."""

    def __init__(self, cmd: list, env: dict):
        self.cmd = cmd
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(cmd, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=self._out,
                                        stderr=self._err, text=True)

    def result(self, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
        try:
            self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        outputs = []
        for f in (self._out, self._err):
            f.seek(0)
            outputs.append(f.read())
            f.close()
        return _checked(subprocess.CompletedProcess(self.cmd, self.process.returncode, *outputs), check)


def run_at_once(cmds: list, env: dict, timeout: int = 900, check: bool = True) -> list:
    """``run`` for independent commands, started together: on 2 cores two processes overlap their start-up
    (imports, model load), which is single-threaded, with each other's work."""
    started = [Started(cmd, env) for cmd in cmds]
    return [s.result(timeout, check) for s in started]


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
