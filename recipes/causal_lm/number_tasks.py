"""The embedded instruction data set: short English questions about numbers, dates and times, with one right answer.

Every answer is produced by a real localisation library, so there is exactly one correct string per prompt and greedy
answers can be scored by exact match; the recipe runs with no download:

* num2words (lang "en"): cardinals in words and back to digits, ordinals, years read aloud, dollar amounts in words;
* babel (locale "en"): ISO dates as long CLDR dates, 24-hour times as 12-hour times.

Whitespace is normalised to ASCII spaces (CLDR uses a narrow no-break space in "11:30 PM"). Examples are deduplicated
on the prompt, shuffled with a fixed seed and split per family, so no prompt appears in two splits, every family has
the same share of validation and test examples, and every run sees the same three sets.
"""

import datetime
import functools
import random
from collections.abc import Iterator
from decimal import Decimal

import datasets
from babel.dates import format_date, format_time
from num2words import num2words

PER_FAMILY = 1200
VALIDATION_PER_FAMILY = 10
TEST_PER_FAMILY = 20

Example = tuple[str, str]


def _number(rng: random.Random) -> int:
    """A number with 1 to 6 digits, each length equally likely (so small numbers are not rare)."""
    digits = rng.randint(1, 6)
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def _family(name: str, rng: random.Random) -> Example:
    match name:
        case "number_to_words":
            n = _number(rng)
            return f"Write {n} in words.", num2words(n, lang="en")
        case "words_to_number":
            n = _number(rng)
            return f"Write {num2words(n, lang='en')} as a number.", str(n)
        case "ordinal":
            n = rng.randint(1, 9999)
            return f"Write the ordinal of {n} in words.", num2words(n, lang="en", to="ordinal")
        case "year":
            year = rng.randint(1100, 2099)
            return f"How is the year {year} read aloud?", num2words(year, lang="en", to="year")
        case "currency":
            amount = Decimal(rng.randrange(100, 100_000)) / 100
            return f"Write ${amount} in words.", num2words(amount, lang="en", to="currency", currency="USD")
        case "date":
            day = datetime.date(1900, 1, 1) + datetime.timedelta(days=rng.randrange(73_048))  # 1900-2099
            return f"Write the date {day.isoformat()} in words.", format_date(day, "long", locale="en")
        case "time":
            time = datetime.time(rng.randrange(24), rng.randrange(60))
            return f"Convert {time.strftime('%H:%M')} to 12-hour time.", format_time(time, "short", locale="en")
    raise ValueError(f"unknown family {name!r}")


FAMILIES = ("number_to_words", "words_to_number", "ordinal", "year", "currency", "date", "time")


def _examples(family: str, rng: random.Random) -> Iterator[Example]:
    seen: set[str] = set()
    for _ in range(PER_FAMILY):
        prompt, completion = (" ".join(text.split()) for text in _family(family, rng))
        if prompt not in seen:
            seen.add(prompt)
            yield prompt, completion


@functools.lru_cache(maxsize=1)  # tests and sweeps call main() repeatedly
def number_task_splits(seed: int = 0) -> dict[str, tuple[dict[str, str], ...]]:
    """`{"train", "validation", "test"}` -> rows `{"prompt", "completion", "family"}`, each split in a seeded order."""
    rng = random.Random(seed)
    splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "test": []}
    for family in FAMILIES:
        rows = [{"prompt": p, "completion": c, "family": family} for p, c in _examples(family, rng)]
        rng.shuffle(rows)
        splits["test"] += rows[:TEST_PER_FAMILY]
        splits["validation"] += rows[TEST_PER_FAMILY : TEST_PER_FAMILY + VALIDATION_PER_FAMILY]
        splits["train"] += rows[TEST_PER_FAMILY + VALIDATION_PER_FAMILY :]
    for rows in splits.values():
        rng.shuffle(rows)
    return {name: tuple(rows) for name, rows in splits.items()}


def load_number_task_dataset(seed: int = 0) -> datasets.DatasetDict:
    """The `DatasetDict` with `test` (140), `validation` (70) and `train` (6550) splits.

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed of the sampled numbers, dates and times and of the split permutation.

    Returns:
        `datasets.DatasetDict`: columns `prompt`, `completion` and `family` (all str).
    """
    return datasets.DatasetDict(
        {name: datasets.Dataset.from_list(list(rows)) for name, rows in number_task_splits(seed).items()}
    )
