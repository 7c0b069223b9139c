"""bench/moe.py runs every section on CPU with a tiny Qwen3-MoE shape, and router replay lowers the
engine/trainer logprob mismatch."""

import json
import math
from pathlib import Path

import torch

from helpers import load_script

BENCH = Path(__file__).resolve().parents[2] / "bench" / "moe.py"


def _load_bench():
    return load_script(BENCH, "moe_bench")


def _numbers(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _numbers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _numbers(value)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield node


def test_tiny_cpu_run_fills_every_section(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "moe.json"
    # --fp8 on: the engine's fp8 experts on their CPU reference path (auto skips fp8 on a CPU).
    bench.main(["--device", "cpu", "--shape", "tiny", "--prompts", "8", "--prompt-len", "16", "--new-tokens", "24",
                "--greedy-prompts", "2", "--greedy-tokens", "16", "--train-steps", "1", "--train-warmup", "1",
                "--fp8", "on", "--json", str(out)])
    results = json.loads(out.read_text())
    for name in ("correctness", "engine", "fp8", "mismatch", "mismatch_dense", "trainer", "hf_dynamic"):
        section = results[name]
        assert "error" not in section and "skipped" not in section, (name, section)
        assert all(math.isfinite(x) for x in _numbers(section)), (name, section)
    assert results["hf_static"]["skipped"].startswith("skipped")  # not run on a CPU by default
    # fp32 on the CPU: the engine's greedy tokens are transformers' (its own experts, untouched copy).
    assert results["correctness"]["identical"] == results["correctness"]["prompts"] == 2
    assert results["engine"]["tokens"] == results["hf_dynamic"]["tokens"] == 8 * 24
    mismatch = results["mismatch"]
    # Without replay some tokens go to other experts than the engine's (else the check below is vacuous);
    # replay routes every token to the engine's experts: what is left is bf16 rounding.
    assert mismatch["moe_r3_off"]["route_agreement"] < 1
    assert 0 < mismatch["moe_r3_on"]["mean"] < mismatch["moe_r3_off"]["mean"]
    assert mismatch["moe_r3_on"]["max"] <= mismatch["moe_r3_off"]["max"]
    assert results["mismatch_dense"]["mean"] > 0 and "route_agreement" not in results["mismatch_dense"]
    assert mismatch["r3_on_vs_dense"] == mismatch["moe_r3_on"]["mean"] / results["mismatch_dense"]["mean"]
    assert 0 < results["trainer"]["mfu"] and results["trainer"]["replayed"] is True
    fp8 = results["fp8"]
    assert fp8["path"].startswith("reference") and fp8["bf16"]["tokens"] == fp8["fp8"]["tokens"] == 8 * 24
    assert 0 < fp8["expert_gib"]["fp8"] < fp8["expert_gib"]["float32"]
    assert 0 < fp8["trainer_fp8_vs_bf16"]["mean"] < 0.1
    table = capsys.readouterr().out.split("| measurement | result | goal |")[1]
    assert "mismatch MoE, R3 on" in table and "engine fp8 experts" in table


def test_fp8_skip_reasons():
    bench = _load_bench()
    config = bench.Qwen3MoeConfig(**bench.SHAPES["tiny"][0])
    cpu = torch.device("cpu")
    assert bench.fp8_skip_reason("auto", cpu, config).startswith("skipped: no fp8 scaled-matmul path on cpu")
    assert bench.fp8_skip_reason("off", cpu, config) == "skipped: --fp8 off"
    assert bench.fp8_skip_reason("on", cpu, config) is None
