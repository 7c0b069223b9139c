"""bench/grpo_step.py runs posttrain end to end on CPU and skips TRL with its reason when trl does not import."""

import json
import sys
from pathlib import Path

from helpers import load_script

BENCH = Path(__file__).resolve().parents[2] / "bench" / "grpo_step.py"


def test_tiny_cpu_run_reports_posttrain_and_skips_trl(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ImportError, installed or not
    bench = load_script(BENCH, "grpo_step")
    out = tmp_path / "out.json"
    bench.main(["--device", "cpu", "--shape", "tiny", "--steps", "2", "--warmup", "1", "--batch", "8",
                "--group-size", "4", "--max-new-tokens", "8", "--out", str(tmp_path / "work"), "--json", str(out),
                "--posttrain-override", "env.num_workers=0"])
    table = capsys.readouterr().out.split("| framework |")[1].splitlines()[2:]
    rows = {cells[1].strip(): cells[2].strip() for cells in (line.split("|") for line in table if line.startswith("|"))}
    assert float(rows["posttrain"]) > 0
    assert rows["trl"].startswith("import trl failed")
    results = json.loads(out.read_text())["results"]
    posttrain = results[0]
    assert posttrain["framework"] == "posttrain" and posttrain["timed_steps"] == 1
    assert 0 < posttrain["tokens_per_step"] <= 8 * 8
    assert results[1] == {"framework": "trl", "skipped": rows["trl"]}
