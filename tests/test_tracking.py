"""W&B online mode without an API key, in an interactive terminal: offline with a warning, never a prompt."""
import os
import pty
import select
import subprocess
import sys
import time

from suite_helpers import REPO, UNREACHABLE

SCRIPT = """
import sys
from pathlib import Path
from transfer.config import WandbConfig
from transfer.tracking import RunLogger

logger = RunLogger(WandbConfig(mode="online", init_timeout=20), Path(sys.argv[1]), name="n", group="g",
                   job_type="j", config={"a": 1})
print("MODE", logger.mode, "ISATTY", sys.stdin.isatty(), flush=True)
logger.finish()
"""


def _run_in_terminal(args: list[str], env: dict, timeout: float) -> tuple[int | None, str]:
    """Run ``args`` with a pseudo-terminal as stdin/stdout/stderr; kill it after ``timeout`` seconds."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                            start_new_session=True)
    os.close(slave)
    out, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal closed: the process is gone
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    if proc.poll() is None:
        proc.kill()
    code = proc.wait()
    os.close(master)
    return (code if time.time() < deadline else None), out.decode(errors="replace")


def test_online_without_a_key_in_a_terminal_logs_offline_instead_of_prompting(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(REPO), HOME=str(home), NETRC=str(home / "no-netrc"), WANDB_BASE_URL=UNREACHABLE,
               WANDB_CONFIG_DIR=str(home / "wandb-config"), WANDB_DIR=str(tmp_path), TERM="xterm")
    code, out = _run_in_terminal([sys.executable, "-c", SCRIPT, str(tmp_path)], env, timeout=300)
    assert code is not None, f"blocked (waiting for input?) after 300 s:\n{out[-2000:]}"
    assert code == 0, out[-2000:]
    assert "MODE offline ISATTY True" in out
    assert "no usable API key" in out and "wandb sync" in out
    assert list((tmp_path / "wandb").glob("offline-run-*")), "the run is kept offline for a later upload"


def test_an_empty_wandb_variable_counts_as_unset(tmp_path):
    """`WANDB_MODE=` exported empty: wandb would stop with a validation traceback; the run logs offline."""
    script = SCRIPT.replace('mode="online"', 'mode="offline"')
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(REPO), HOME=str(tmp_path), WANDB_MODE="", WANDB_DIR=str(tmp_path),
               WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MODE offline" in done.stdout
