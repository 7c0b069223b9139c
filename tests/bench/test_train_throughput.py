"""The training-throughput benchmark runs end to end on CPU (the lead runs the GPU version)."""

from pathlib import Path

from helpers import load_script

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train_throughput.py"


def test_tiny_cpu_run_prints_a_row_per_variant_and_reports_errors(capsys):
    bench = load_script(BENCH, "train_throughput")
    bench.main(["--shapes", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1",
                "--variants", "naive,posttrain,posttrain+rows128,posttrain+nosuch"])
    table = capsys.readouterr().out.split("| shape | variant |")[1].splitlines()[2:]
    rows = {cells[2]: cells[3] for cells in (line.split("|") for line in table)}
    layouts = {cells[2]: cells[6].strip() for cells in (line.split("|") for line in table)}
    assert layouts[" naive "] == "padded"
    for variant in (" posttrain ", " posttrain+rows128 "):  # packed, and the same logprobs as padded rows
        layout, within = layouts[variant].split(", logprobs within ")
        assert layout == "packed" and float(within.split()[0]) < 1e-4
    assert set(rows) == {" naive ", " posttrain ", " posttrain+rows128 ", " posttrain+nosuch "}
    for variant in (" naive ", " posttrain ", " posttrain+rows128 "):
        assert float(rows[variant].replace(",", "")) > 0  # tokens/s
    assert rows[" posttrain+nosuch "].startswith(" error: ValueError: unknown variant")
