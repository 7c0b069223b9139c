"""Write Celsius-to-Fahrenheit prompts for the weather example as JSON lines.

    python examples/weather_env/make_data.py --out weather.jsonl [--num 1000] [--seed 0]

Each row: {"prompt": "...", "celsius": 21.5, "expected_answer": 70.7}. posttrain turns
"prompt" into the user message and passes the other columns to the environment as metadata
("expected_answer" is also the default data.answer_column). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CITIES = [
    "Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Montreal", "Cairo", "Reykjavik", "Perth",
    "Denver", "Mumbai", "Warsaw", "Santiago", "Anchorage", "Singapore", "Marrakesh",
]
TEMPLATES = [
    "The forecast for {city} says {c} degrees Celsius tomorrow. What is that in degrees Fahrenheit?",
    "It is {c} degrees Celsius in {city} right now. Convert this temperature to Fahrenheit.",
    "Convert {c} degrees Celsius to degrees Fahrenheit.",
    "A thermometer in {city} reads {c} C. How many degrees Fahrenheit is that?",
]
INSTRUCTION = "Answer with the number only."


def make_rows(num: int, seed: int) -> list[dict]:
    """``num`` prompts with temperatures from -40 to 45 C (whole or half degrees), seeded."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        celsius = rng.randint(-80, 90) / 2  # -40.0 ... 45.0 in steps of 0.5
        c_text = f"{celsius:g}"
        prompt = rng.choice(TEMPLATES).format(city=rng.choice(CITIES), c=c_text)
        fahrenheit = round(celsius * 9 / 5 + 32, 2)
        rows.append({"prompt": f"{prompt} {INSTRUCTION}", "celsius": celsius, "expected_answer": fahrenheit})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="weather.jsonl", help="output JSONL file (default: ./weather.jsonl)")
    parser.add_argument("--num", type=int, default=1000, help="number of rows (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error("--num must be at least 1")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row in make_rows(args.num, args.seed):
            f.write(json.dumps(row) + "\n")
    print(f"wrote {args.num} rows to {out}")


if __name__ == "__main__":
    main()
