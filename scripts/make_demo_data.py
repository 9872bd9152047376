"""Generate the demo task `edgeft/demo/data/smarthome.jsonl`: smart-home commands → one-line JSON actions.

Why: the demo needs a small task that a tiny model cannot do before fine-tuning and can do after, with an
exact-match answer. Commands are built from templates, rooms, devices and values with a fixed seed, so the
file is the same on every run. Each line is {"prompt": command, "completion": json_action}; the JSON has
fixed key order (action, device, room[, value]) and no spaces. The held-out split is made by
`edgeft.data.split` (seeded), so no separate eval file is written.

Usage: python scripts/make_demo_data.py [--out edgeft/demo/data/smarthome.jsonl] [--n 1200] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "edgeft" / "demo" / "data" / "smarthome.jsonl"

ROOMS = {
    "living room": "living_room",
    "bedroom": "bedroom",
    "kitchen": "kitchen",
    "bathroom": "bathroom",
    "office": "office",
    "hallway": "hallway",
    "dining room": "dining_room",
    "garage": "garage",
    "basement": "basement",
    "guest room": "guest_room",
    "kids room": "kids_room",
    "attic": "attic",
}
DOORS = {"front": "front", "back": "back", "garage": "garage", "patio": "patio", "side": "side"}
# device id → spoken names
SWITCHABLE = {
    "light": ["lights", "light", "lamp"],
    "fan": ["fan", "ceiling fan"],
    "tv": ["tv", "television"],
    "heater": ["heater", "space heater"],
    "speaker": ["speaker", "music speaker"],
    "ac": ["air conditioner", "ac", "air conditioning"],
}
COVERS = {"blinds": ["blinds"], "curtains": ["curtains", "drapes"], "window": ["window", "windows"]}
PREFIXES = ["", "", "", "please ", "could you ", "can you ", "hey, ", "i want you to ", "go ahead and "]
SUFFIXES = ["", "", "", " please", " now", " thanks", " for me", "."]

Gen = Callable[[random.Random], tuple[str, dict]]


def _room(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(sorted(ROOMS))
    return name, ROOMS[name]


def switch(on: bool) -> Gen:
    """turn_on / turn_off of a switchable device in a room."""

    def gen(rng: random.Random) -> tuple[str, dict]:
        dev = rng.choice(sorted(SWITCHABLE))
        spoken = rng.choice(SWITCHABLE[dev])
        room, rid = _room(rng)
        word = "on" if on else "off"
        verb = rng.choice(["switch", "turn"] if on else ["switch", "turn", "shut"])
        t = rng.choice(
            [
                f"{verb} {word} the {room} {spoken}",
                f"{verb} the {spoken} in the {room} {word}",
                f"{verb} the {room} {spoken} {word}",
                f"{spoken} {word} in the {room}",
                f"i need the {spoken} {word} in the {room}",
                (f"power up the {spoken} in the {room}" if on else f"kill the {spoken} in the {room}"),
            ]
        )
        return t, {"action": "turn_on" if on else "turn_off", "device": dev, "room": rid}

    return gen


def brightness(rng: random.Random) -> tuple[str, dict]:
    """set_brightness of the lights in a room to a percentage."""
    room, rid = _room(rng)
    v = rng.choice([rng.randrange(5, 100, 5), rng.randint(1, 100)])
    lights = rng.choice(["lights", "light", "lamp"])
    pct = rng.choice(["percent", "%", " percent", "% brightness"]).lstrip()
    pct_text = f"{v}{pct}" if pct.startswith("%") else f"{v} {pct}"
    t = rng.choice(
        [
            f"dim the {room} {lights} to {pct_text}",
            f"set the {room} {lights} to {pct_text}",
            f"brighten the {lights} in the {room} to {pct_text}",
            f"make the {room} {lights} {pct_text}",
            f"change the brightness in the {room} to {pct_text}",
            f"{room} {lights} at {pct_text}",
            f"set brightness of the {room} {lights} to {v}",
        ]
    )
    return t, {"action": "set_brightness", "device": "light", "room": rid, "value": v}


def temperature(rng: random.Random) -> tuple[str, dict]:
    """set_temperature of the thermostat in a room, in degrees."""
    room, rid = _room(rng)
    v = rng.randint(16, 30)
    deg = rng.choice(["degrees", "degrees celsius", "degrees c"])
    t = rng.choice(
        [
            f"set the {room} thermostat to {v} {deg}",
            f"make it {v} {deg} in the {room}",
            f"change the {room} temperature to {v}",
            f"heat the {room} to {v} {deg}",
            f"cool the {room} down to {v} {deg}",
            f"i want the {room} at {v} {deg}",
            f"thermostat in the {room} to {v}",
        ]
    )
    return t, {"action": "set_temperature", "device": "thermostat", "room": rid, "value": v}


def volume(rng: random.Random) -> tuple[str, dict]:
    """set_volume of a speaker or tv in a room."""
    room, rid = _room(rng)
    dev = rng.choice(["speaker", "tv"])
    spoken = rng.choice(SWITCHABLE[dev])
    v = rng.choice([rng.randrange(0, 101, 5), rng.randint(0, 100)])
    t = rng.choice(
        [
            f"set the {room} {spoken} volume to {v}",
            f"turn the volume of the {spoken} in the {room} to {v}",
            f"volume {v} on the {room} {spoken}",
            f"change the {spoken} volume in the {room} to {v}",
            f"make the {room} {spoken} volume {v}",
        ]
    )
    return t, {"action": "set_volume", "device": dev, "room": rid, "value": v}


def lock(locked: bool) -> Gen:
    """lock / unlock a door (front, back, garage, patio, side)."""

    def gen(rng: random.Random) -> tuple[str, dict]:
        name = rng.choice(sorted(DOORS))
        verb = "lock" if locked else "unlock"
        t = rng.choice(
            [
                f"{verb} the {name} door",
                f"{verb} {name} door",
                f"make sure the {name} door is {verb}ed",
                f"{verb} the door at the {name}",
                f"can the {name} door be {verb}ed",
            ]
        )
        return t, {"action": verb, "device": "door", "room": DOORS[name]}

    return gen


def cover(opening: bool) -> Gen:
    """open / close blinds, curtains or windows in a room."""

    def gen(rng: random.Random) -> tuple[str, dict]:
        dev = rng.choice(sorted(COVERS))
        spoken = rng.choice(COVERS[dev])
        room, rid = _room(rng)
        verb = "open" if opening else "close"
        alt = "raise" if opening else "lower"
        t = rng.choice(
            [
                f"{verb} the {room} {spoken}",
                f"{verb} the {spoken} in the {room}",
                f"{verb} up the {spoken} in the {room}" if opening else f"shut the {spoken} in the {room}",
                f"{alt} the {room} {spoken}" if dev == "blinds" else f"{verb} {room} {spoken}",
            ]
        )
        return t, {"action": verb, "device": dev, "room": rid}

    return gen


# (generator, weight): value-taking actions get more examples because they are harder to copy right.
GENERATORS: list[tuple[Gen, int]] = [
    (switch(True), 3),
    (switch(False), 3),
    (brightness, 3),
    (temperature, 3),
    (volume, 2),
    (lock(True), 1),
    (lock(False), 1),
    (cover(True), 1),
    (cover(False), 1),
]


def style(rng: random.Random, text: str) -> str:
    """Add a polite prefix/suffix and sometimes capitalize, so phrasing varies beyond the templates."""
    text = rng.choice(PREFIXES) + text + rng.choice(SUFFIXES)
    return text[0].upper() + text[1:] if rng.random() < 0.4 else text


def make(n: int, seed: int) -> list[dict[str, str]]:
    """`n` distinct {"prompt", "completion"} records, deterministic for a seed."""
    rng = random.Random(seed)
    gens = [g for g, w in GENERATORS for _ in range(w)]
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < n:
        text, action = rng.choice(gens)(rng)
        prompt = " ".join(style(rng, text).split())
        if prompt.lower() in seen:
            continue
        seen.add(prompt.lower())
        rows.append({"prompt": prompt, "completion": json.dumps(action, separators=(",", ":"))})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = make(args.n, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} examples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
