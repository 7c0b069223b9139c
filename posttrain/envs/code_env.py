"""Code-execution environment: reward = fraction of test cases the model's Python code passes.

The code is the last ```python (or ```py / bare ```) fenced block of the last assistant message,
else the whole message. ``metadata["tests"]`` is a list whose items are either

- a string: Python statements (usually ``assert f(2) == 4``) run after the code, in the same
  program; the test passes if the program reaches the end of them and exits with status 0 (a
  line with a random marker is printed after the test and must arrive: code that exits early
  with status 0, ``sys.exit(0)`` before the asserts, is a known reward hack and counts as
  ``early_exits``); or
- a dict ``{"input": stdin, "output": expected_stdout}``: the code runs alone with that stdin; the
  test passes if it exits with status 0 and its stdout equals the expected output (compared
  with trailing whitespace stripped on every line and trailing blank lines dropped).

Every test is a separate run of ``posttrain.envs.sandbox.run_python``. Note that the reward
pool's per-sample limit (``env.timeout_s``) must cover all of a sample's tests.
"""

from __future__ import annotations

import re
import secrets
from typing import Any


from posttrain.envs.base import Environment, EnvironmentReturn, MessageLog
from posttrain.envs.sandbox import run_python
from posttrain.errors import ConfigError, PosttrainError

_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str:
    """The last ```python fenced block (else the last bare ``` block), else the whole text."""
    blocks = [(m.group(1), m.group(2)) for m in _FENCE.finditer(response)]
    tagged = [body for lang, body in blocks if lang]
    if tagged:
        return tagged[-1]
    if blocks:
        return blocks[-1][1]
    return response


def _normalise_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).rstrip()


def _response_text(message_log: MessageLog) -> str:
    for message in reversed(message_log):
        if message.get("role") == "assistant":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


class CodeEnvironment(Environment):
    """Single-turn Python solutions checked against ``metadata["tests"]`` in a sandbox.

    Reward: passed tests / number of tests (0.0 to 1.0). Per-sample metadata gains
    ``tests_passed``, ``tests_total``, ``timeouts``, ``crashes`` (runs killed by a limit or
    a signal) and ``early_exits`` (assert tests whose program exited 0 before their end);
    ``global_post_process_and_metrics`` logs the pass, timeout, crash and early-exit rates.
    """

    required_metadata = ("tests",)

    def __init__(
        self,
        timeout_s: float = 5.0,
        cpu_s: float = 5.0,
        memory_mb: int = 512,
        max_output_bytes: int = 65536,
        nproc: int = 32,
        max_file_mb: int = 16,
    ) -> None:
        try:
            self.timeout_s = float(timeout_s)
            self.cpu_s = float(cpu_s)
            self.memory_mb = int(memory_mb)
            self.max_output_bytes = int(max_output_bytes)
            self.nproc = int(nproc)
            self.max_file_mb = int(max_file_mb)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"env.kwargs for the code environment must be numbers: {e}") from e
        if min(self.timeout_s, self.cpu_s) <= 0 or min(self.memory_mb, self.max_output_bytes, self.nproc) < 1:
            raise ConfigError(
                "env.kwargs.timeout_s and cpu_s must be > 0 and memory_mb, max_output_bytes, nproc >= 1 "
                "(e.g. env.kwargs.timeout_s=5 env.kwargs.memory_mb=512)."
            )

    def _run(self, code: str, stdin: str = ""):
        return run_python(
            code, stdin=stdin, timeout_s=self.timeout_s, cpu_s=self.cpu_s, memory_mb=self.memory_mb,
            max_output_bytes=self.max_output_bytes, nproc=self.nproc, max_file_mb=self.max_file_mb,
        )

    def score(self, code: str, tests: list[Any]) -> dict[str, Any]:
        """Run every test; returns tests_passed, tests_total, timeouts, crashes."""
        passed = timeouts = crashes = early_exits = 0
        for test in tests:
            if isinstance(test, str):
                # Printed after the test: a program that exits 0 before its asserts never prints it.
                marker = f"posttrain-tests-done-{secrets.token_hex(8)}"
                result = self._run(f"{code}\n\n{test}\n\nprint({marker!r}, flush=True)\n")
                exited = result.returncode == 0 and result.killed_reason is None
                reached_end = result.stdout.rstrip().endswith(marker)
                ok = exited and reached_end
                early_exits += exited and not reached_end
            elif isinstance(test, dict) and "output" in test:
                result = self._run(code, str(test.get("input", "")))
                ok = (
                    result.returncode == 0
                    and result.killed_reason is None
                    and _normalise_output(result.stdout) == _normalise_output(str(test["output"]))
                )
            else:
                raise PosttrainError(
                    f"code environment: test {test!r} is neither an assert string nor a dict "
                    '{"input": ..., "output": ...}. Fix the "tests" column of the data.'
                )
            passed += ok
            timeouts += result.timed_out
            crashes += (not result.timed_out) and result.killed_reason is not None
        return {"tests_passed": passed, "tests_total": len(tests), "timeouts": timeouts, "crashes": crashes,
                "early_exits": early_exits}

    def step(self, message_log_batch: list[MessageLog], metadata: list[dict[str, Any]]) -> EnvironmentReturn:
        """Score B conversations; rewards (B,) float in [0, 1], terminateds (B,) all True."""
        rewards: list[float] = []
        out_meta: list[dict[str, Any] | None] = []
        observations: list[dict[str, Any]] = []
        answers: list[str | None] = []
        for i, (log, meta) in enumerate(zip(message_log_batch, metadata, strict=True)):
            tests = meta.get("tests") if isinstance(meta, dict) else None
            if not isinstance(tests, list) or not tests:
                raise PosttrainError(
                    f"sample {i} has no 'tests' list in its metadata, which the code environment needs: "
                    'a list of assert strings or {"input": ..., "output": ...} dicts.'
                )
            code = extract_code(_response_text(log))
            stats = self.score(code, tests)
            reward = stats["tests_passed"] / stats["tests_total"]
            rewards.append(reward)
            out_meta.append({**meta, **stats})
            observations.append(
                {"role": "environment", "content": f"passed {stats['tests_passed']}/{stats['tests_total']} tests"}
            )
            answers.append(code)
        return EnvironmentReturn.final(rewards, observations=observations, metadata=out_meta, answers=answers)

    def global_post_process_and_metrics(self, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        """all_passed_rate, timeout_rate (samples with a timed-out test), crash_rate, and
        early_exit_rate (samples whose program exited 0 before reaching the end of a test)."""
        metadata = [m for m in batch.get("metadata") or [] if isinstance(m, dict) and "tests_total" in m]
        if not metadata:
            return batch, {}
        n = len(metadata)
        return batch, {
            "all_passed_rate": sum(m["tests_passed"] == m["tests_total"] for m in metadata) / n,
            "timeout_rate": sum(m["timeouts"] > 0 for m in metadata) / n,
            "crash_rate": sum(m["crashes"] > 0 for m in metadata) / n,
            "early_exit_rate": sum(m.get("early_exits", 0) > 0 for m in metadata) / n,
        }
