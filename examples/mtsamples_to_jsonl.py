"""Turn the public MTSamples transcriptions into instruction data for examples/lora_pretrained.toml.

Each line becomes {"prompt": specialty and description, "response": the transcription's first
words, "specialty": ...}: the model learns to draft a transcription from a one-line summary,
and the specialty drives the job's label-skewed (Dirichlet) split across hospitals.

    python examples/mtsamples_to_jsonl.py [--csv $FEDSKY_DATA/mtsamples/mtsamples.csv]
        [--out runs/mtsamples-instruct.jsonl] [--words 120]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path


def main() -> None:
    default = Path(os.environ.get("FEDSKY_DATA", "../shared/data")) / "mtsamples/mtsamples.csv"
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", type=Path, default=default)
    ap.add_argument("--out", type=Path, default=Path("runs/mtsamples-instruct.jsonl"))
    ap.add_argument("--words", type=int, default=120, help="words of transcription kept")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with args.csv.open(encoding="utf-8", newline="") as f, args.out.open("w") as out:
        for row in csv.reader(f):  # no header: index, description, specialty, name, text, keys
            if len(row) < 5 or not row[4].strip():
                continue
            specialty, description = row[2].strip(), row[1].strip()
            text = " ".join(row[4].replace(":,", ":").split()[: args.words])
            prompt = f"Specialty: {specialty}\nSummary: {description}\nTranscription: "
            out.write(json.dumps({"prompt": prompt, "response": text,
                                  "specialty": specialty}) + "\n")
            n += 1
    print(f"{n} examples -> {args.out}")


if __name__ == "__main__":
    main()
