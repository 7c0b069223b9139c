"""Ctrl-C during training: exit code 130, a checkpoint of the last whole step, no orphan workers,
and the run resumes from that checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import posttrain.trainer.grpo as grpo
from helpers import save_tiny_model
from posttrain.cli import main
from test_grpo_e2e import read_metrics, tiny_run_args

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent


def _wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def _step_lines(run_dir: Path) -> int:
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    return sum('"reward/mean"' in line for line in text.splitlines() if line.endswith("}"))


def _child_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone: it holds no resources)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step_*"))


def _signal_after_two_steps(tmp_path: Path, run_dir: Path, args: list[str],
                            sig: signal.Signals) -> tuple[int, str, list[int]]:
    """Run `posttrain` in a session of its own and, after 2 steps, send ``sig`` to the whole process
    group (as a terminal's Ctrl-C or Slurm's preemption does). Returns (exit code, output, the
    trainer's child pids when signalled)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), str(REPO_ROOT), env.get("PYTHONPATH")]))
    log_path = tmp_path / "output.txt"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "posttrain", *args], cwd=tmp_path, env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_for(lambda: _step_lines(run_dir) >= 2 or proc.poll() is not None, 60, "2 training steps")
        assert proc.poll() is None, f"trainer exited early:\n{log_path.read_text()}"
        children = _child_pids(proc.pid)
        assert children, "expected reward worker processes"
        os.killpg(proc.pid, sig)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"trainer did not exit after {sig.name}:\n{log_path.read_text()}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return code, log_path.read_text(), children


def test_ctrl_c_checkpoints_last_whole_step_and_resumes(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    run_dir = tmp_path / "run"
    args = tiny_run_args(model_dir, run_dir, 1000, "checkpoint.every=0", "validation.at_start=false")
    code, output, children = _signal_after_two_steps(tmp_path, run_dir, args, signal.SIGINT)
    assert code == 130, output
    assert "interrupted" in output

    # The checkpoint holds a whole step: one whose metrics line was written, and the last one.
    checkpoints = _checkpoints(run_dir)
    assert len(checkpoints) == 1, (checkpoints, output)
    step = json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"]
    metrics = read_metrics(run_dir)
    assert step >= 2 and step in metrics and step == max(metrics), (step, sorted(metrics))
    model = AutoModelForCausalLM.from_pretrained(checkpoints[0])
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))

    _wait_for(lambda: not any(_alive(p) for p in children), 10, f"reward workers {children} to exit")

    # In-process, with the environment in this process: the workers were checked above.
    resume_args = tiny_run_args(model_dir, run_dir, step + 1, "checkpoint.every=0", "env.num_workers=0", "--resume")
    assert main(resume_args) == 0
    assert sorted(read_metrics(run_dir))[-2:] == [step, step + 1]
    assert _checkpoints(run_dir)[-1].name == f"step_{step + 1:06d}"


def test_interrupt_during_update_finishes_the_step_and_its_metrics(tmp_path, monkeypatch, capfd):
    """Ctrl-C during the weight update (deterministically, at step 2): the update and its metrics
    line complete, then the run stops with a checkpoint of step 2."""
    real_update = grpo.policy_update
    calls = []

    def update_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # delivered inside the deferred block
        return real_update(*args, **kwargs)

    monkeypatch.setattr(grpo, "policy_update", update_then_interrupt)
    model_dir = save_tiny_model(tmp_path / "model")
    run_dir = tmp_path / "run"
    args = tiny_run_args(model_dir, run_dir, 1000, "checkpoint.every=0", "validation.at_start=false",
                         "env.num_workers=0")
    assert main(args) == 130
    assert len(calls) == 2
    captured = capfd.readouterr()
    assert "finishing the weight update in progress" in captured.err
    assert "saving a checkpoint at the last completed step (2)" in captured.out
    assert sorted(read_metrics(run_dir)) == [1, 2]
    assert [p.name for p in _checkpoints(run_dir)] == ["step_000002"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_checkpoints_last_whole_step_exits_143_and_resume_auto_continues(tmp_path):
    """SIGTERM to the whole process group, as Slurm sends it at preemption: the trainer finishes its
    step, checkpoints it, says so and exits 143; the reward workers ignore it and follow the trainer.
    The same `--resume auto` command line started the run (no checkpoint yet: a new run) and resumes it."""
    model_dir = save_tiny_model(tmp_path / "model")
    run_dir = tmp_path / "run"
    args = tiny_run_args(model_dir, run_dir, 1000, "checkpoint.every=0", "validation.at_start=false", "--resume", "auto")
    code, output, children = _signal_after_two_steps(tmp_path, run_dir, args, signal.SIGTERM)
    assert code == 143, output
    assert "--resume auto: no checkpoint in" in output
    assert "stopped by SIGTERM (a second SIGTERM ends the process at once): saving a checkpoint" in output
    assert "posttrain: stopped by SIGTERM." in output
    assert "Traceback" not in output, output

    checkpoints = _checkpoints(run_dir)
    assert len(checkpoints) == 1, (checkpoints, output)
    step = json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"]
    metrics = read_metrics(run_dir)
    assert step >= 2 and step in metrics and step == max(metrics), (step, sorted(metrics))
    _wait_for(lambda: not any(_alive(p) for p in children), 10, f"reward workers {children} to exit")

    resume_args = tiny_run_args(model_dir, run_dir, step + 1, "checkpoint.every=0", "env.num_workers=0",
                                "--resume", "auto")
    assert main(resume_args) == 0
    assert sorted(read_metrics(run_dir))[-2:] == [step, step + 1]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() put the default back


def test_sigterm_in_sft_waits_for_the_step_and_exits_143(tmp_path, monkeypatch, capfd):
    """In-process: SIGTERM while step 2 writes its metrics line (inside the update's deferred block)."""
    from posttrain.logging.metrics import MetricsLogger
    from test_sft import sft_args, write_chats

    real_log = MetricsLogger.log

    def log_then_terminate(self, step, metrics, prefix=""):
        real_log(self, step, metrics, prefix)
        if step == 2 and "loss" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLogger, "log", log_then_terminate)
    model_dir = save_tiny_model(tmp_path / "model")
    run_dir = tmp_path / "run"
    args = sft_args(model_dir, write_chats(tmp_path / "chats.jsonl"), run_dir, 50, "checkpoint.every=0",
                    "trainer.eval_every=0")
    assert main(args) == 143
    captured = capfd.readouterr()
    assert "SIGTERM: finishing the weight update in progress" in captured.err
    assert "saving a checkpoint at the last completed step (2)" in captured.out
    assert [p.name for p in _checkpoints(run_dir)] == ["step_000002"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_resume_auto_needs_an_output_dir(capsys):
    assert main(["sft", "data.train_path=x.jsonl", "--resume", "auto"]) == 2
    assert "--resume auto needs trainer.output_dir" in capsys.readouterr().err


def test_a_second_sigterm_ends_the_process_at_once(tmp_path):
    """The first SIGTERM waits for the update in progress; a second one ends the process at once,
    with the status a SIGTERM'd process has (a scheduler's second signal, or a user's)."""
    script = (
        "import os, signal, sys, time\n"
        "from posttrain.errors import sigterm_as_interrupt\n"
        "from posttrain.trainer.interrupt import InterruptGuard\n"
        "with sigterm_as_interrupt(), InterruptGuard() as guard, guard.deferred():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.2)\n"
        "    print('still updating', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "print('not reached', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "still updating\n"
    assert proc.stderr.count("SIGTERM: finishing the weight update in progress") == 1


def test_sigterm_in_dpo_waits_for_the_step_and_exits_143(tmp_path, monkeypatch, capfd):
    from posttrain.logging.metrics import MetricsLogger
    from test_dpo import run_args, write_pairs

    real_log = MetricsLogger.log

    def log_then_terminate(self, step, metrics, prefix=""):
        real_log(self, step, metrics, prefix)
        if step == 2 and "loss" in metrics:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLogger, "log", log_then_terminate)
    model_dir = save_tiny_model(tmp_path / "model")
    run_dir = tmp_path / "run"
    assert main(run_args(model_dir, write_pairs(tmp_path / "pairs.jsonl", 24), run_dir, 50, "checkpoint.every=0")) == 143
    captured = capfd.readouterr()
    assert "stopped by SIGTERM (a second SIGTERM ends the process at once): saving a checkpoint at the last " \
           "completed step (2)" in captured.out
    assert [p.name for p in _checkpoints(run_dir)] == ["step_000002"]
