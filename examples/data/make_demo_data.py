"""Generate the demo dataset: pull the person, city and date out of a sentence as one line of JSON.

    python examples/data/make_demo_data.py        # rewrites demo_train.jsonl and demo_val.jsonl

The task is small enough to learn in a few dozen LoRA steps on a CPU, and easy to check by eye:
the answer must be exactly `{"person": ..., "city": ..., "date": "YYYY-MM-DD"}`, with the date
normalised from however the sentence wrote it. The instruction does not spell the format out, so
only fine-tuning teaches it: SmolLM2-135M-Instruct, asked as is, invents keys and ids
(`"event_id": "1234567890"`), spreads the JSON over many lines and keeps dates as written.

The output is deterministic (fixed seed). Validation sentences use first names, surnames and
cities that never appear in training, so a right answer there means the model learned the task,
not the examples.
"""

import json
import random
from pathlib import Path

SEED = 1234
N_TRAIN = 320
N_VAL = 40
HERE = Path(__file__).resolve().parent

INSTRUCTION = "Extract the event as JSON."

FIRST_NAMES = [
    "Priya", "Tom", "Aiko", "Lucas", "Fatima", "Oliver", "Mei", "Jonas", "Sofia", "Kwame",
    "Elena", "Ravi", "Hannah", "Diego", "Noor", "Pablo", "Ingrid", "Samuel", "Chloe", "Tariq",
    "Anna", "Victor", "Leila", "Marco", "Yuki", "Grace", "Omar", "Nina", "Felix", "Zara",
]
SURNAMES = [
    "Shah", "Becker", "Tanaka", "Silva", "Khan", "Wright", "Chen", "Berg", "Rossi", "Mensah",
    "Petrov", "Patel", "Meyer", "Garcia", "Haddad", "Lopez", "Larsen", "Okafor", "Martin", "Aziz",
    "Novak", "Dubois", "Karimi", "Costa", "Sato", "Walsh", "Farah", "Ivanova", "Wagner", "Reyes",
]
CITIES = [
    "Lisbon", "Berlin", "Osaka", "Toronto", "Nairobi", "Madrid", "Seoul", "Oslo", "Dublin", "Lima",
    "Cairo", "Vienna", "Denver", "Manila", "Prague", "Accra", "Helsinki", "Perth", "Quito", "Zurich",
    "Hamburg", "Boston", "Kyoto", "Lagos", "Porto", "Warsaw", "Austin", "Hanoi", "Bergen", "Rome",
]
# Held out: these only ever appear in validation sentences.
VAL_FIRST_NAMES = ["Amara", "Henrik", "Lucia", "Kenji", "Rosa", "Idris", "Maya", "Stefan"]
VAL_SURNAMES = ["Lindqvist", "Moreau", "Nakamura", "Oduya", "Fischer", "Romero", "Kowalski", "Hughes"]
VAL_CITIES = ["Glasgow", "Bogota", "Munich", "Sydney", "Geneva", "Tunis", "Chicago", "Krakow"]

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]
SENTENCES = [
    "{name} will arrive in {city} on {date}.",
    "On {date}, {name} flew to {city}.",
    "{name} has a meeting in {city} on {date}.",
    "{name} is giving a talk in {city} on {date}.",
    "We booked a hotel in {city} for {name} on {date}.",
    "{date}: {name} starts a new job in {city}.",
    "{name} moved to {city} on {date}.",
    "The train carrying {name} reaches {city} on {date}.",
]


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def spell_date(rng: random.Random, year: int, month: int, day: int) -> str:
    """The date written the way people write it, in one of several styles."""
    name = MONTHS[month - 1]
    styles = [
        f"{name} {day}, {year}",
        f"{day} {name} {year}",
        f"the {ordinal(day)} of {name} {year}",
        f"{name[:3]} {day}, {year}",
    ]
    return rng.choice(styles)


def example(rng: random.Random, first: list[str], last: list[str], cities: list[str]) -> dict[str, str]:
    name = f"{rng.choice(first)} {rng.choice(last)}"
    city = rng.choice(cities)
    year, month, day = rng.randint(2019, 2027), rng.randint(1, 12), rng.randint(1, 28)
    sentence = rng.choice(SENTENCES).format(name=name, city=city, date=spell_date(rng, year, month, day))
    sentence = sentence[0].upper() + sentence[1:]
    answer = {"person": name, "city": city, "date": f"{year:04d}-{month:02d}-{day:02d}"}
    return {"instruction": INSTRUCTION, "input": sentence, "output": json.dumps(answer)}


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    train = [example(rng, FIRST_NAMES, SURNAMES, CITIES) for _ in range(N_TRAIN)]
    val = [example(rng, VAL_FIRST_NAMES, VAL_SURNAMES, VAL_CITIES) for _ in range(N_VAL)]
    write_jsonl(HERE / "demo_train.jsonl", train)
    write_jsonl(HERE / "demo_val.jsonl", val)
    print(f"wrote {len(train)} training and {len(val)} validation examples to {HERE}")


if __name__ == "__main__":
    main()
