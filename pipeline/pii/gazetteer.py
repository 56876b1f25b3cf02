"""Word lists the contextual detectors consult: given and family names, common words, names to keep.

Names come from Faker's person providers (a maintained package with name lists for 80+ locales), for the
locales configured in ``sanitize.pii.name_locales``. Common words (Faker's English word list plus the
function words, months, weekdays and support-chat vocabulary below) stop a capitalised ordinary word
from being read as a name. ``keep_names.txt`` lists public figures and companies named after people
("Morgan Stanley", "Albert Einstein"): a bare mention of them is not personal data; after a personal
cue ("my name is ...") it still is.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

KEEP_FILE = Path(__file__).with_name("keep_names.txt")

# Capitalised words that start sentences or sit in greetings, sign-offs, products and places: never a
# name on their own, whatever a locale's name list says ("Will", "May", "Can", "Best", "Paris" are all in one).
_COMMON = """
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves
january february march april may june july august september october november december
jan feb mar apr jun jul aug sep sept oct nov dec
monday tuesday wednesday thursday friday saturday sunday mon tue tues wed thu thur thurs fri sat sun
today tomorrow yesterday morning evening afternoon night week month year weekend christmas easter
hello hi hey dear thanks thank regards best cheers sincerely yours kind warm wishes greetings please sorry
yes ok okay sure great good fine well hope also still just again
customer client user team support service sales billing account order orders ticket invoice refund delivery
shipping package parcel product products item items payment card bank office store shop company manager admin
sir madam madame mister miss mrs mr ms dr prof doctor professor
street road avenue lane drive court place square way close park hill city town village county state country
north south east west new old great little big upper lower saint san santa st
app web mobile cloud server data api pro max plus mini ultra premium standard basic free home
english french german spanish italian dutch polish chinese japanese russian arabic
"""


_STOP = frozenset(_COMMON.split("customer")[0].split())  # everything before the support-chat vocabulary


@dataclass(frozen=True)
class Gazetteer:
    first: frozenset[str]
    last: frozenset[str]
    common: frozenset[str]  # casefolded
    keep: frozenset[str]  # casefolded full names

    def is_first(self, word: str) -> bool:
        return word in self.first and word.casefold() not in self.common

    def is_last(self, word: str) -> bool:
        return word in self.last and word.casefold() not in self.common

    def is_common(self, word: str) -> bool:
        return word.casefold() in self.common

    def is_stop(self, word: str) -> bool:
        """Function words, months, weekdays, greetings: never a name, even after "my name is Robert"."""
        return word.casefold() in _STOP


def _names(locale: str) -> tuple[set[str], set[str]]:
    try:
        provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
    except ModuleNotFoundError:
        raise ValueError(f"sanitize.pii.name_locales: no name list for locale {locale!r} in Faker") from None
    first: set[str] = set()
    last: set[str] = set()
    for attr in dir(provider):  # first_names, first_names_female, male_last_names, ... (locales differ)
        into = first if "first_names" in attr else last if "last_names" in attr else None
        value = getattr(provider, attr, None) if into is not None else None
        if isinstance(value, (list, tuple, dict, set, frozenset)):
            for name in value:
                if isinstance(name, str):
                    # A family name with particles ("van der Kint") is matched by its last word.
                    into.update({name, name.split()[-1]} if " " in name else {name})
    return first, last


# Scripts without capital letters: their names are found after cues (pipeline/pii/context.py), never bare.
_UNCASED_LANGUAGES = {"ar", "zh", "ja", "ko", "hi", "he", "fa", "bn", "gu", "ta", "th", "ne", "mr", "or", "si", "ka", "hy",
                      "tw", "ur", "pa", "te", "ml", "kn", "my", "km", "lo", "am"}


def all_locales() -> list[str]:
    """Every Faker person locale written in a cased script (Latin, Cyrillic, Greek): what ``*`` means."""
    import pkgutil

    import faker.providers.person as person

    return sorted(m.name for m in pkgutil.iter_modules(person.__path__)
                  if m.name.split("_")[0] not in _UNCASED_LANGUAGES)


def expand(locales: tuple[str, ...] | list[str]) -> list[str]:
    out: list[str] = []
    for loc in locales:
        out += all_locales() if loc == "*" else [loc]
    return list(dict.fromkeys(out))


@lru_cache(maxsize=8)
def load(locales: tuple[str, ...], keep: tuple[str, ...] = ()) -> Gazetteer:
    first: set[str] = set()
    last: set[str] = set()
    for locale in expand(locales):
        f, l_ = _names(locale)
        first |= f
        last |= l_
    from faker.providers.lorem.en_US import Provider as Lorem

    common = set(_COMMON.split()) | {w.casefold() for w in Lorem.word_list}
    kept = {line.strip().casefold() for line in KEEP_FILE.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")}
    kept |= {k.casefold() for k in keep}
    return Gazetteer(frozenset(first), frozenset(last), frozenset(common), frozenset(kept))


def locale_exists(locale: str) -> bool:
    try:
        importlib.import_module(f"faker.providers.person.{locale}")
    except ModuleNotFoundError:
        return False
    return True
