"""bench/weight_sync.py runs on CPU and prints its table (the broadcast row needs a second
process and is covered by tests/sync/test_modes.py and the end-to-end test)."""

from pathlib import Path

from helpers import load_script

BENCH = Path(__file__).resolve().parents[2] / "bench" / "weight_sync.py"


def test_bench_smoke_on_cpu(capsys):
    bench = load_script(BENCH, "bench_weight_sync")
    assert bench.main(["--device", "cpu", "--shape", "tiny", "--repeats", "1", "--modes", "shared,copy,checkpoint,lora"]) == 0
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| mode")}
    assert rows["shared"] == "0.0"
    assert set(rows) == {"shared", "copy (same device)", "checkpoint", "lora (r=16, all-linear)"}
    assert float(rows["checkpoint"]) > 0
