"""The embedded translation data set: German -> English phrases about numbers, dates, times and money.

Every pair is produced by two real localisation libraries, so the English side is a genuine translation of the
German side, and the recipe runs with no download:

* num2words (lang "de" / "en"): cardinals, ordinals, years, decimals and currency amounts in words;
* babel (locales "de" / "en"): dates in the full, long, medium and short CLDR formats, times, decimal numbers and
  percentages.

Whitespace is normalised to ASCII spaces (CLDR uses narrow no-break spaces, e.g. "2:30 PM"). Pairs are deduplicated
on the German side (first family wins), shuffled with a fixed seed and split, so no source sentence appears in two
splits and every run sees the same three sets.
"""

import datetime
import functools
import random
from collections.abc import Callable, Iterator
from decimal import Decimal

import datasets
from babel.dates import format_date, format_time
from babel.numbers import format_decimal, format_percent
from num2words import num2words

NUM_VALIDATION = 500
NUM_TEST = 1000

Pair = tuple[str, str]


def _words(value: int | Decimal, **kwargs: str) -> Pair:
    return num2words(value, lang="de", **kwargs), num2words(value, lang="en", **kwargs)


def _babel(formatter: Callable[..., str], value: object, *args: str) -> Pair:
    return formatter(value, *args, locale="de"), formatter(value, *args, locale="en")


def _families(rng: random.Random) -> Iterator[tuple[str, Pair]]:
    """Yield `(family, (german, english))`, family by family, in a fixed order."""
    for n in [*range(1000), *rng.sample(range(1000, 1_000_000), 4000)]:
        yield "cardinal", _words(n)
    for n in [*range(1, 501), *rng.sample(range(501, 100_000), 1500)]:
        yield "ordinal", _words(n, to="ordinal")
    for n in range(1000, 2100):
        # Only years read differently from the cardinal ("neunzehnhundert..."): in German, 1000-1099 and 2000-2099
        # are read as cardinals, so their English year reading would contradict the cardinal family.
        if num2words(n, lang="de", to="year") != num2words(n, lang="de"):
            yield "year", _words(n, to="year")
    for _ in range(1500):
        yield "decimal_words", _words(Decimal(rng.randrange(1, 100_000)) / 10 ** rng.choice([1, 2]))
    for _ in range(2000):
        amount = Decimal(rng.randrange(100, 1_000_000)) / 100
        yield "currency", _words(amount, to="currency", currency=rng.choice(["EUR", "USD"]))
    start = datetime.date(1900, 1, 1)
    for fmt in ["full", "long", "medium", "short"]:
        for _ in range(1000):
            yield f"date_{fmt}", _babel(format_date, start + datetime.timedelta(days=rng.randrange(73_048)), fmt)
    for _ in range(1000):
        time = datetime.time(rng.randrange(24), rng.randrange(60))
        yield "time", _babel(format_time, time, rng.choice(["short", "medium"]))
    for _ in range(1000):
        yield (
            "decimal_format",
            _babel(format_decimal, Decimal(rng.randrange(1, 10_000_000)) / 10 ** rng.choice([0, 1, 2])),
        )
    for _ in range(500):
        yield "percent", _babel(format_percent, Decimal(rng.randrange(1, 100_000)) / 1000)


@functools.lru_cache(maxsize=1)  # generating takes seconds; tests and sweeps call main() repeatedly
def number_phrase_pairs(seed: int = 0) -> tuple[dict[str, object], ...]:
    """All pairs as `{"translation": {"de", "en"}, "family"}`, deduplicated on the source, in a seeded order."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, object]] = []
    for family, (german, english) in _families(rng):
        german, english = " ".join(german.split()), " ".join(english.split())
        if german not in seen:
            seen.add(german)
            rows.append({"translation": {"de": german, "en": english}, "family": family})
    rng.shuffle(rows)
    return tuple(rows)


def load_number_phrase_dataset(seed: int = 0) -> datasets.DatasetDict:
    """The `DatasetDict` with `test` (1000), `validation` (500) and `train` (the rest, about 16k) splits.

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed of the sampled numbers, dates and of the split permutation.

    Returns:
        `datasets.DatasetDict`: columns `translation` (`{"de": str, "en": str}`) and `family` (str).
    """
    rows = number_phrase_pairs(seed)
    splits = {
        "train": rows[NUM_TEST + NUM_VALIDATION :],
        "validation": rows[NUM_TEST : NUM_TEST + NUM_VALIDATION],
        "test": rows[:NUM_TEST],
    }
    features = datasets.Features(
        {"translation": datasets.Translation(languages=["de", "en"]), "family": datasets.Value("string")}
    )
    return datasets.DatasetDict(
        {name: datasets.Dataset.from_list(list(split), features=features) for name, split in splits.items()}
    )
