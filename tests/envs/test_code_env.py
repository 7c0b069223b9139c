from __future__ import annotations

import pytest

from posttrain.envs.code_env import CodeEnvironment, extract_code
from posttrain.errors import ConfigError, PosttrainError

ASSERTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]
IO = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"}]


def conv(response: str) -> list[dict]:
    return [{"role": "user", "content": "Write add."}, {"role": "assistant", "content": response}]


def env() -> CodeEnvironment:
    return CodeEnvironment(timeout_s=3, cpu_s=2, memory_mb=256)


def test_extract_code_prefers_last_python_block():
    text = "First\n```python\nx = 1\n```\nthen\n```\nplain\n```\n```py\ny = 2\n```\n"
    assert extract_code(text).strip() == "y = 2"
    assert extract_code("```\nz = 3\n```").strip() == "z = 3"
    assert extract_code("print(1)") == "print(1)"


def test_assert_tests_full_partial_and_zero():
    e = env()
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    partial = "```python\ndef add(a, b):\n    return 3 if a == 1 else a + b + (a == 2)\n```"
    bad = "def add(a, b): return None"
    ret = e.step([conv(good), conv(partial), conv(bad)], [{"tests": ASSERTS, "id": i} for i in range(3)])
    assert ret.rewards.tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    assert ret.metadata[0]["tests_passed"] == 3 and ret.metadata[0]["id"] == 0
    assert ret.terminateds.all() and ret.answers[0].startswith("def add")


def test_stdin_stdout_tests():
    e = env()
    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    wrong = "```python\na, b = map(int, input().split())\nprint(a * b)\n```"
    ret = e.step([conv(good), conv(wrong)], [{"tests": IO}, {"tests": IO}])
    assert ret.rewards.tolist() == pytest.approx([1.0, 0.0])


def test_timeouts_and_crashes_are_counted_in_metrics():
    e = CodeEnvironment(timeout_s=1, cpu_s=1, memory_mb=256, max_output_bytes=1000)
    loop = "```python\nwhile True: pass\n```"
    spam = "```python\nwhile True: print('x' * 100)\n```"
    ret = e.step([conv(loop), conv(spam)], [{"tests": IO[:1]}, {"tests": IO[:1]}])
    assert ret.rewards.tolist() == [0.0, 0.0]
    assert ret.metadata[0]["timeouts"] == 1 and ret.metadata[1]["crashes"] == 1
    _, metrics = e.global_post_process_and_metrics({"metadata": ret.metadata})
    assert metrics["timeout_rate"] == 0.5 and metrics["crash_rate"] == 0.5 and metrics["all_passed_rate"] == 0.0


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit",
                                       "import sys\nsys.stdout.close()"])
def test_a_program_that_exits_before_the_asserts_passes_nothing(exit_call):
    """Exiting with status 0 before the test's asserts run is a known reward hack of assert-based
    code rewards; the test must reach its end (a marker printed after it) to pass."""
    e = env()
    hack = f"```python\ndef add(a, b):\n    return None\n{exit_call}\n```"
    printing = "```python\ndef add(a, b):\n    print('adding', a, b)\n    return a + b\nprint('ready')\n```"
    ret = e.step([conv(hack), conv(printing)], [{"tests": ASSERTS}, {"tests": ASSERTS}])
    assert ret.rewards.tolist() == pytest.approx([0.0, 1.0])  # output of its own does not hurt a solution
    assert ret.metadata[0]["early_exits"] == (0 if "close" in exit_call else 3)
    _, metrics = e.global_post_process_and_metrics({"metadata": ret.metadata})
    assert metrics["early_exit_rate"] == (0.0 if "close" in exit_call else 0.5)


def test_required_metadata_and_bad_inputs():
    assert CodeEnvironment.required_metadata == ("tests",)
    with pytest.raises(PosttrainError, match="tests"):
        env().step([conv("x")], [{"id": 1}])
    with pytest.raises(PosttrainError, match="neither"):
        env().step([conv("x")], [{"tests": [42]}])
    with pytest.raises(ConfigError):
        CodeEnvironment(timeout_s=0)


def test_registry_can_resolve_by_path():
    from posttrain.envs.registry import resolve_env_class

    assert resolve_env_class("posttrain.envs.code_env.CodeEnvironment") is CodeEnvironment
