"""The shipped demo: a tiny pretrained base model and a smart-home command → JSON action task.

`DEMO_MODEL` is built by scripts/train_demo_model.py (offline text only, never the task data) and
`DEMO_DATA` by scripts/make_demo_data.py; `edgeft build` with no arguments fine-tunes one on the other.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO_MODEL: Path = HERE / "model"
DEMO_DATA: Path = HERE / "data" / "smarthome.jsonl"
