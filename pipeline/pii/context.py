"""Personal data that has no fixed shape and is found by its context: names, postal addresses, dates of
birth, passport and national id numbers; and parcel tracking numbers, which look like personal data
but are not.

- **Names**: after a cue that introduces a person ("my name is", "Dear", "Mr/Ms/Dr", a "Name:" field, a
  sign-off line such as "Best regards,\\n", and the same cues in German, French, Spanish, Italian, Dutch,
  Portuguese, Russian), or a bare capitalised sequence whose first word is a given name and last word a
  family name in the gazetteer (pipeline/pii/gazetteer.py). Weak cues ("I'm", "this is", "Hi") need a
  gazetteer given name. Public figures and eponymous companies in ``keep_names.txt`` survive bare.
- **Addresses**: a house number with a street name and type (English, French, Spanish, Italian order:
  "221B Baker Street", "8, avenue Manon Gillet", "Viale Parisi, 171"; German and Dutch order:
  "Hauptstraße 5"), extended over flat/suite, city and postcode of the configured regions; a postcode
  line with the city; PO boxes and US military addresses. "our Paris office" has no street, so it stays.
- **Dates of birth**: a date after a birth cue; other dates stay.
- **Id numbers**: a passport, identity card, licence, tax or insurance number after its cue, and without
  a cue the national ids that carry a check character or a fixed shape (Spanish DNI/NIE, Italian codice
  fiscale, French NIR, British National Insurance number).
"""

from __future__ import annotations

import re
import sys
from functools import lru_cache

from pipeline.pii.gazetteer import Gazetteer
from pipeline.pii.patterns import Detector

# Punctuation becomes a space before a text is split into words: one C-level pass that gives every
# contextual detector the words it needs to decide whether to run its regexes at all (Python's ``re``
# scans at tens of MB/s per pattern; most texts carry none of a detector's cue words).
_PUNCT = str.maketrans({c: " " for c in "!\"#$%&'()*+,./:;<=>?@[\\]^_`{|}~«»“”‘’„—–-\u00a0"})


class Words:
    """The words of one text, as written and lower-cased, computed once and shared by the detectors."""

    __slots__ = ("text", "case", "lower", "_low_text", "_ends")

    def __init__(self, text: str) -> None:
        self.text = text
        self.case: frozenset[str] = frozenset(text.translate(_PUNCT).split())
        self.lower: frozenset[str] = frozenset(w.lower() for w in self.case)
        self._low_text: str | None = None
        self._ends: str | None = None

    @property
    def low_text(self) -> str:
        if self._low_text is None:
            self._low_text = self.text.lower()
        return self._low_text

    def ends_with(self, suffixes: tuple[str, ...]) -> bool:
        """Whether a word ends with one of ``suffixes`` (substring tests on the joined words)."""
        if self._ends is None:
            self._ends = " ".join(self.lower) + " "
        return any(sfx + " " in self._ends for sfx in suffixes)


def _cue_words(alternation: str) -> frozenset[str]:
    """Every word of a cue alternation (lower-cased letters only): the trigger set of its detector. An
    optional suffix group also counts glued on ("reisepass(?:nummer)?" gives "reisepassnummer")."""
    glued = re.sub(r"\(\?:([^()|]*)\)\?", r"\1", alternation)
    words = re.findall(r"[^\W\d_]+", alternation.lower()) + re.findall(r"[^\W\d_]+", glued.lower())
    return frozenset(w for w in words if len(w) > 1 or w in ("я", "i"))


@lru_cache(maxsize=1)
def _upper_class() -> str:
    """A regex class of every uppercase letter (``re`` has no \\p{Lu})."""
    ranges: list[tuple[int, int]] = []
    for cp in range(sys.maxunicode + 1):
        if chr(cp).isupper():
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1] = (ranges[-1][0], cp)
            else:
                ranges.append((cp, cp))
    return "[" + "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                         for a, b in ranges) + "]"


_U = _upper_class()
_L = r"[^\W\d_]"  # any letter
# One name word: capitalised, with apostrophes and hyphens inside (O'Brien, Jean-Luc, McDonald), or an initial.
_WORD = rf"(?:{_U}\.|{_U}{_L}*(?:['’\-]{_U}?{_L}+)*(?!\d))"  # not the letter of a model name ("S24")
_PARTICLE = r"(?:van|von|der|den|de|du|des|da|di|del|della|dos|das|la|le|bin|ibn|al|el|ter|ten|zu|y)"
# A full name: one to four name words, particles between them ("Ludwig van Beethoven", "María de la Cruz").
_NAME = rf"(?P<v>{_WORD}(?:[ \t]+(?:{_PARTICLE}[ \t]+)*{_WORD}){{0,3}})"

def _branches(alternation: str) -> list[str]:
    """The top-level branches of a regex alternation."""
    depth, start = 0, 0
    parts = []
    for i, ch in enumerate(alternation + "|"):
        if ch == "(" and (i == 0 or alternation[i - 1] != "\\"):
            depth += 1
        elif ch == ")" and alternation[i - 1] != "\\":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(alternation[start:i])
            start = i + 1
    return parts


def _optional_group(part: str) -> bool:
    """Whether ``part`` starts with a group that may match nothing (followed by ? or *)."""
    depth = 0
    for i, ch in enumerate(part):
        if ch == "(" and (i == 0 or part[i - 1] != "\\"):
            depth += 1
        elif ch == ")" and part[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return part[i + 1:i + 2] in ("?", "*")
    return False


def _lead(alternation: str) -> str:
    """A look-ahead for the first characters an alternation can start with. Python's ``re`` tries every
    branch at every position; this one-character test first is what keeps the cue patterns fast."""
    firsts: set[str] = set()
    for part in _branches(alternation):
        if part.startswith("(") and _optional_group(part):
            return ""  # "(?:kind )?regards" can start with either word
        part = re.sub(r"^(?:\(\?:)+", "", part)
        ch = part[1] if part.startswith("\\") else part[:1]
        if not ch or ch in "([.":
            return ""  # a branch that starts with a class or group: no safe look-ahead
        firsts |= {ch.lower(), ch.upper()}
    return "(?=[" + "".join(re.escape(c) for c in sorted(firsts)) + "])"


_STRONG_CUES = (
    r"my name is", r"my name's", r"my full name is", r"i am called", r"call me", r"name[ \t]*:", r"full name[ \t]*:",
    r"(?:customer|client|patient|contact|account holder|cardholder|card holder|recipient|sender|applicant)"
    r"(?: name)?[ \t]*:", r"signed[ \t]*:", r"from[ \t]*:", r"to[ \t]*:", r"attn\.?[ \t]*:?", r"c/o",
    r"dear", r"mein name ist", r"ich hei(?:ß|ss)e", r"je m['’]appelle", r"mon nom est", r"me llamo", r"mi nombre es",
    r"mi chiamo", r"il mio nome è", r"mijn naam is", r"ik heet", r"meu nome é", r"chamo-me", r"меня зовут",
    r"мо[её] имя", r"мене звати", r"nom[ \t]*:", r"vorname[ \t]*:", r"nachname[ \t]*:", r"nombre[ \t]*:",
    r"nome[ \t]*:", r"με λένε", r"ονομάζομαι", r"το όνομά μου είναι", r"benim adım", r"jag heter", r"jeg heter",
    r"mit navn er", r"nazywam się", r"jmenuji se", r"nimeni on", r"a nevem", r"numele meu este", r"mă numesc",
)
_TITLES = (r"Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Madam|Herr|Frau|Mme|Mlle|Monsieur|Madame|Señor|Señora|Sra|Srta|"
           r"Dott|Dott\.ssa|Signor|Signora|Dhr|Mevr|Sig|MR|MRS|MS|DR")
_WEAK_CUES = (r"i['’]m|i am|this is|it['’]s|hi|hello|hey|thanks|thank you|ich bin|je suis|soy|sono|ik ben|sou|"
              r"hallo|bonjour|salut|hola|ciao|olá|привет|я|liebe[rs]?|sehr geehrte[rs]?|cher|chère|estimad[oa]|"
              r"caro|cara|beste|geachte|querid[oa]")
_SIGN_OFFS = (r"best[ \t]+regards|kind[ \t]+regards|warm[ \t]+regards|warmest[ \t]+regards|kindest[ \t]+regards|"
              r"with[ \t]+regards|regards|best[ \t]+wishes|warm[ \t]+wishes|many[ \t]+thanks|with[ \t]+thanks|cheers|thanks|"
              r"thank you|sincerely|yours(?:[ \t]+(?:truly|sincerely|faithfully))?|best|respectfully|cordially|"
              r"take care|mit freundlichen gr(?:ü|ue)(?:ß|ss)en|(?:viele|liebe|beste|herzliche)[ \t]+gr(?:ü|ue)(?:ß|ss)e|"
              r"gru(?:ß|ss)|cordialement|bien à vous|amicalement|bien cordialement|saludos(?:[ \t]+cordiales)?|"
              r"atentamente|un saludo|cordiali saluti|distinti saluti|saluti|met vriendelijke groet(?:en)?|"
              r"groeten|atenciosamente|abraços|с уважением|з повагою|med vänliga hälsningar|mvh|pozdrawiam|"
              r"z poważaniem|s pozdravem|saygılarımla|με εκτίμηση|ystävällisin terveisin|üdvözlettel|cu stimă|"
              r"venlig hilsen|med vennlig hilsen")
def _literal(branch: str) -> tuple[str, ...] | None:
    """The lower-case phrases a cue branch matches when it is a plain phrase (optional blanks dropped,
    required ones as one space; an apostrophe class gives both apostrophes), else None."""
    text = branch.replace("[ \\t]*", "").replace("[ \\t]+", " ")
    variants = [text.replace("['’]", q) for q in ("'", "’")] if "['’]" in text else [text]
    if all(re.fullmatch(r"[^\W\d_](?:[^\W\d_]| |:|/|'|’)*", v) for v in variants):
        return tuple(dict.fromkeys(v.lower() for v in variants))
    return None


def _head_words(branch: str) -> frozenset[str]:
    """The words a branch must start with: those before its first blank (any one of them)."""
    head = re.split(r"\[ \\t\][*+]|[ ]", branch, maxsplit=1)[0]
    return _cue_words(head) or _cue_words(branch)


_FIELD = re.compile(r"(?<!\(\?):")  # a cue that ends in a colon ("Customer name:"), not a group's "(?:"


class _Narrowed:
    """A cue pattern compiled with only the cues whose words a text contains (cached per cue set): a
    regex with one or two cues scans many times faster than one with a hundred."""

    def __init__(self, cues: str, template: str, flags: int = 0, after: tuple[str, ...] = ("",)) -> None:
        # A branch that is a plain phrase ("my name is", "to[ \t]*:") is looked for as a substring of the
        # lower-cased text; others by their words.
        self.cues = [(b, _head_words(b), _literal(b)) for b in _branches(cues)]
        self.template, self.flags, self.after = template, flags, after
        self.full = self._compile(tuple(b for b, _, _ in self.cues))
        # Branches by the words they start with: a text's words pick the few branches worth checking.
        self.by_word: dict[str, list[int]] = {}
        self.always: list[int] = []
        for i, (_, head, lit) in enumerate(self.cues):
            keys = {v.translate(_PUNCT).split()[0] for v in lit if v.translate(_PUNCT).split()} if lit else head
            for k in keys or ():
                self.by_word.setdefault(k, []).append(i)
            if not keys:
                self.always.append(i)
        self.keys = frozenset(self.by_word)

    @lru_cache(maxsize=512)  # noqa: B019 - a handful of module-level instances
    def _compile(self, chosen: tuple[str, ...]) -> re.Pattern[str]:
        alternation = "|".join(chosen)
        return re.compile(self.template.replace("CUES", f"{_lead(alternation)}(?:{alternation})"), self.flags)

    def pattern(self, words: Words) -> re.Pattern[str] | None:
        candidates = set(self.always)
        for word in self.keys.intersection(words.lower):
            candidates.update(self.by_word[word])
        if not candidates:
            return None
        low = words.low_text
        chosen = []
        for i in sorted(candidates):
            b, _, lit = self.cues[i]
            if lit is not None:
                ok = any(v in low and any(v + a in low for a in self.after) for v in lit)
            else:
                ok = ":" in low or not _FIELD.search(b)
            if ok:
                chosen.append(b)
        return self._compile(tuple(chosen)) if chosen else None

    def finditer(self, text: str):
        return self.full.finditer(text)


_STRONG = _Narrowed("|".join(_STRONG_CUES), rf"\b(?i:CUES)[ \t]*,?[ \t]*{_NAME}")
_TITLED = re.compile(rf"(?<!\w)(?:{_TITLES})\.?[ \t]+{_NAME}")
_WEAK = _Narrowed(_WEAK_CUES, rf"\b(?i:CUES)[ \t]*,?[ \t]+{_NAME}")
# A sign-off at the end of a line, then the name on the next line (a signature) or after a comma.
_SIGNATURE = _Narrowed(_SIGN_OFFS, rf"(?im:^[ \t]*CUES[ \t]*[,!.]?(?:[ \t]*\r?\n){{1,2}}[ \t]*|(?:^|[.!?][ \t]+)CUES,[ \t]*)"
                       rf"(?-i:{_NAME})[ \t]*$", re.M, after=(",", "\n", "!", ".", " \n", "\r"))
_STRONG_WORDS = _cue_words("|".join(_STRONG_CUES))
_WEAK_WORDS = _cue_words(_WEAK_CUES)
_TITLE_WORDS = _cue_words(_TITLES)
_SIGN_OFF_WORDS = _cue_words(_SIGN_OFFS)
_DASH_SIGNATURE = re.compile(rf"(?m:^[ \t]*(?:--|—|–)[ \t]*{_NAME}[ \t]*$)")
_BARE = re.compile(rf"(?<![\w'’\-]){_WORD}(?:[ \t]+(?:{_PARTICLE}[ \t]+)*{_WORD})+(?![\w'’\-])")
# Cues in scripts without capital letters: the next words (spaced) or characters (Han, kana) are the name.
_UNCASED = re.compile(r"(?:اسمي|أنا اسمي|שמי|मेरा नाम|我叫|我的名字是|我的名字叫|私の名前は|わたしは|제 이름은|저는)[ \t]*"
                      r"(?P<v>[\u0600-\u06ff\u0590-\u05ff\u0900-\u097f]+(?:[ \t]+[\u0600-\u06ff\u0590-\u05ff\u0900-\u097f]+){0,2}"
                      r"|(?:[\u4e00-\u9fff\u3040-\u30ff]{1,4}[ 　])?[\u4e00-\u9fff\u3040-\u30ff]{1,4}?"
                      r"(?=[ 、，。！？,.!?\s]|です|と申します|$)|[\uac00-\ud7af]{2,4}?(?=입니다|이에요|예요|이라고|라고|[ ,.!?]|$))")

# Words that end a company or a place rather than a person: "Morgan Stanley Bank", "Jackson Heights".
_NOT_PERSON_AFTER = re.compile(r"[ \t]*(?:&|and[ \t]+Co\b|Inc\b|Ltd\b|LLC\b|GmbH\b|AG\b|SA\b|S\.A\.|PLC\b|plc\b|Corp\b|"
                               r"Co\.|Company\b|Group\b|Bank\b|Foundation\b|University\b|College\b|School\b|"
                               r"Hospital\b|Institute\b|Museum\b|Airport\b|Station\b|Hotel\b|Street\b|Road\b|"
                               r"Avenue\b|Park\b|Square\b|Bridge\b|Prize\b|Award\b|Law\b|Effect\b|Theorem\b)")


# Words that make a signature a team's or a company's.
_TEAM = frozenset("team support service services desk department crew group staff helpdesk office inc ltd llc gmbh "
                  "customer care".split())


def _name_span(m: re.Match[str], gz: Gazetteer, strong: bool) -> tuple[int, int] | None:
    """The span of the name a cue introduces, or None when what follows the cue is not a name."""
    start = m.start("v")
    words = m.group("v").split()
    # A cue is followed by the name and maybe more capitalised words; keep the run of name-like words.
    kept: list[str] = []
    for w in words:
        bare = w.rstrip(".")
        if re.fullmatch(_PARTICLE, w):
            kept.append(w)
            continue
        known = bare in gz.first or bare in gz.last or bare.title() in gz.first or bare.title() in gz.last
        if bare.casefold() in _TEAM:  # "Best,\nAcme Support": a team signs, not a person
            return None
        if gz.is_common(bare) and not (strong and known and (kept == [] or not gz.is_stop(bare))):
            break
        if len(bare) > 1 and bare.isupper() and not known:  # an acronym ("call me ASAP"), not a name
            break
        kept.append(w)
    while kept and re.fullmatch(_PARTICLE, kept[-1]):
        kept.pop()
    if not kept:
        return None
    end = start + _prefix_len(m.group("v"), kept)
    if strong:
        return start, end
    # A weak cue needs a given name it knows ("Hi, Pages load slowly" is not a name), or a full name of two
    # uncommon capitalised words one of which a list knows ("Hi Jolana Novák"; "Microsoft Teams" is neither).
    two_names = (len(kept) >= 2 and all(not gz.is_common(w) and not (w.isupper() and len(w) > 1) for w in kept[:2])
                 and (kept[0] in gz.first or kept[-1] in gz.last))
    if not (gz.is_first(kept[0]) or two_names) or " ".join(kept).casefold() in gz.keep:
        return None
    if _NOT_PERSON_AFTER.match(m.string, end):  # "Thanks Ernst & Young"
        return None
    return start, end


def _prefix_len(text: str, words: list[str]) -> int:
    """Length of the prefix of ``text`` that holds ``words`` (the original spacing kept)."""
    pos = 0
    for w in words:
        pos = text.index(w, pos) + len(w)
    return pos


_WORD_RE = re.compile(rf"{_WORD}|{_PARTICLE}")


def _bare_names(m: re.Match[str], gz: Gazetteer) -> list[tuple[int, int]]:
    """Within a run of capitalised words, each window that starts with a given name and ends with a family
    name ("Yesterday John A. Smith called" -> "John A. Smith"), unless kept or followed by a company word."""
    words = [(w.group(), w.start(), w.end()) for w in _WORD_RE.finditer(m.string, m.start(), m.end())]
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(words):
        if not gz.is_first(words[i][0]):
            i += 1
            continue
        best = None
        for j in range(i + 1, min(i + 4, len(words))):
            w = words[j][0]
            if gz.is_last(w) and len(w) > 1 and not re.fullmatch(_PARTICLE, w):
                best = j
            elif not (re.fullmatch(_PARTICLE, w) or w.endswith(".") or gz.is_first(w)):
                break
        if best is None:
            i += 1
            continue
        start, end = words[i][1], words[best][2]
        text = m.string[start:end]
        short = f"{words[i][0]} {words[best][0]}".casefold()
        if text.casefold() in gz.keep or short in gz.keep or _NOT_PERSON_AFTER.match(m.string, end):
            i = best + 1
            continue
        out.append((start, end))
        i = best + 1
    return out


class NameDetector:
    """Finds personal names; a ``Detector`` whose matches are computed rather than one regex's."""

    kind = "NAME"

    def __init__(self, gz: Gazetteer) -> None:
        self.gz = gz
        # Given names that are not also common words: a text with none of them has no bare name.
        self.given = frozenset(n for n in gz.first if not gz.is_common(n))
        # A weak cue needs a name the gazetteer knows (a given name, or a family name in a full name).
        self.known = self.given | frozenset(n for n in gz.last if not gz.is_common(n))
        self.gates = ((_STRONG, True, _STRONG_WORDS), (_TITLED, True, _TITLE_WORDS),
                      (_SIGNATURE, True, _SIGN_OFF_WORDS), (_DASH_SIGNATURE, False, None), (_WEAK, False, _WEAK_WORDS))

    def spans(self, text: str, words: Words | None = None) -> list[tuple[int, int]]:
        words = words or Words(text)
        found: list[tuple[int, int]] = []
        for pattern, strong, triggers in self.gates:
            if triggers is None:
                if "—" not in text and "--" not in text and "–" not in text:
                    continue
            elif triggers.isdisjoint(words.lower) or (not strong and self.known.isdisjoint(words.case)):
                continue
            if isinstance(pattern, _Narrowed):
                pattern = pattern.pattern(words)
                if pattern is None:
                    continue
            for m in pattern.finditer(text):
                span = _name_span(m, self.gz, strong)
                if span:
                    found.append(span)
        if not text.isascii():
            for m in _UNCASED.finditer(text):
                found.append(m.span("v"))
        if not self.given.isdisjoint(words.case):
            for m in _BARE.finditer(text):
                found.extend(_bare_names(m, self.gz))
        return _merge(found)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


# ---- postal addresses ----------------------------------------------------------------------------
# Street types that make "12 Oak X" an address on their own; the longer USPS list needs a unit or a city and
# postcode after it ("3 Data Center" is not an address, "58683 Mitchell Parks Suite 907" is).
_EN_CORE = (r"Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Terrace|Ter|Boulevard|Blvd|Close|"
            r"Crescent|Cres|Gardens|Gdns|Grove|Mews|Parade|Parkway|Pkwy|Highway|Hwy|Circle|Cir|Broadway|Way")
_EN_TYPES = (r"Street|St|Road|Rd|Avenue|Ave|Av|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Square|Sq|Terrace|Ter|Boulevard|"
             r"Blvd|Way|Close|Crescent|Cres|Gardens|Gdns|Grove|Gr|Hill|Mews|Parade|Parkway|Pkwy|Highway|Hwy|Circle|"
             r"Cir|Trail|Trl|Row|Walk|Park|Green|Rise|View|Vale|Wharf|Yard|Gate|Approach|Broadway|Loop|Path|Pike|"
             r"Plaza|Point|Ridge|Run|Bypass|Crossing|Alley|Route|Rte|Expressway|Freeway|Turnpike|Causeway|Quay|"
             r"Embankment|Heights|Village|Fields|Field|Meadows|Mill|Mills|Port|Ports|Shore|Shores|Springs|Station|"
             r"Summit|Track|Trace|Union|Valley|Ville|Villages|Vista|Wall|Well|Wells|Junction|Knoll|Lake|Lakes|"
             r"Landing|Light|Lights|Lodge|Manor|Mount|Mountain|Orchard|Oval|Pass|Passage|Pine|Pines|Plain|Plains|"
             r"Ranch|Rapids|Rest|Route|Spur|Stream|Throughway|Tunnel|Underpass|Via|Viaduct|Ways|Brook|Brooks|Burg|"
             r"Camp|Canyon|Cape|Center|Centre|Cliff|Cliffs|Club|Common|Corner|Corners|Course|Courts|Cove|Creek|Crest|"
             r"Curve|Dale|Dam|Divide|Estate|Estates|Extension|Falls|Ferry|Flat|Flats|Ford|Forest|Forge|Fork|Forks|"
             r"Fort|Glen|Harbor|Harbour|Haven|Hills|Hollow|Inlet|Island|Isle|Key|Keys|Knolls|Locks|Motorway|Neck|"
             r"Prairie|Radial|Shoal|Shoals|Skyway|Squares|Streets|Terr|Pkwy|Drives|Roads|Branch|Bridge|Bluff|Bluffs|"
             r"Bottom|Bend|Beach|Arcade")
_ROMANCE_TYPES = (r"rue|avenue|av\.|boulevard|bd|bld|place|pl\.|chemin|ch\.|allée|impasse|imp\.|quai|route|rte|cours|"
                  r"passage|square|voie|sentier|rond-point|faubourg|calle|c/|avenida|avda\.?|plaza|paseo|camino|"
                  r"carretera|ronda|travesía|callejón|cuesta|glorieta|cañada|pasaje|acceso|vial|rambla|c\.|urbanización|"
                  r"urb\.|polígono|carrer|passeig|avinguda|pasadizo|via|viale|piazza|piazzale|corso|canale|incrocio|"
                  r"vicolo|largo|strada|contrada|borgo|stretto|rotonda|rua|travessa|praça|alameda|estrada|ulica|ul\.|"
                  r"aleja|al\.|plac|pl\.|osiedle|os\.|ул\.|улица|пр\.|проспект|пер\.|переулок|бул\.|бульвар|ш\.|шоссе|"
                  r"наб\.|набережная|пл\.|площадь")
_GERMANIC_CORE = (r"straße|strasse|str\.|weg|gasse|platz|allee|damm|ufer|chaussee|gracht|laan|plein|singel|kade|"
                  r"straat|steeg|vej|gatan|gata|veien|katu|utca|ulice")
# Endings that are also ordinary word endings ("Spring 2024", "Firewall 2"): only with a postcode after them.
_GERMANIC_SUFFIX = (rf"{_GERMANIC_CORE}|ring|steig|pfad|markt|berg|hof|graben|kamp|stieg|wall|zeile|promenade|twiete|"
                    r"dijk|dreef|tie|út|baan|pad|boulevard|park|plantsoen|hof|veld|markt|erf|wal")
_NUM = r"\d{1,5}(?:[ \t]?[A-Za-z](?![A-Za-z]))?(?:[-/]\d{1,5}[A-Za-z]?)?"
# The same, written to start with its character class: ``re`` then skips straight to digits instead of
# testing a look-behind at every position (twice as fast on long texts).
_NUM_FIRST = r"\d(?<![\w-]\d)\d{0,4}(?:[ \t]?[A-Za-z](?![A-Za-z]))?(?:[-/]\d{1,5}[A-Za-z]?)?"
_SW = rf"(?:{_U}[\w'’.\-]*|\d{{1,3}}(?:st|nd|rd|th)|de|du|des|la|le|l['’]|d['’]|of|the|van|von)"  # street-name word
_UNIT = (r"(?:(?:,?[ \t]*(?:Apt|Apartment|Suite|Ste|Unit|Flat|Floor|Fl|Bldg|Building|Room|Rm|Piso|Puerta|Pta|Escalera|"
         r"Esc|Portal|Bajo|Planta|Appartamento|App|Piano|Scala|Interno|Int|Étage|Etage|Bâtiment|Bât|Appartement|Wohnung|"
         r"Whg|Stock|Bus|kv|кв|#)\.?[ \t]*#?\w{1,6}){1,3})")
_POSTCODES = {
    "US": r"\d{5}(?:-\d{4})?", "GB": r"[A-Z]{1,2}\d[A-Z\d]?[ \t]?\d[A-Z]{2}", "CA": r"[A-Z]\d[A-Z][ \t]?\d[A-Z]\d",
    "DE": r"\d{5}", "FR": r"\d{5}", "ES": r"\d{5}", "IT": r"\d{5}", "NL": r"\d{4}[ \t]?[A-Z]{2}", "BE": r"\d{4}",
    "AT": r"\d{4}", "CH": r"\d{4}", "PL": r"\d{2}-\d{3}", "PT": r"\d{4}-\d{3}", "SE": r"\d{3}[ \t]?\d{2}",
    "DK": r"\d{4}", "NO": r"\d{4}", "FI": r"\d{5}", "IE": r"[A-Z]\d{2}[ \t]?[A-Z\d]{4}", "AU": r"\d{4}",
    "RU": r"\d{6}", "IN": r"\d{6}", "BR": r"\d{5}-?\d{3}", "MX": r"\d{5}", "JP": r"\d{3}-\d{4}",
}
_CITY = rf"(?:['’]s-)?{_U}[\w'’.\-]*(?:[ \t]+(?:{_U}[\w'’.\-]*|de|du|la|le|sur|am|an|der|im|on|upon|en|di|del)){{0,3}}"


@lru_cache(maxsize=1)
def _usps_types() -> str:
    """Street types: ours plus the USPS suffix list Faker ships (its addresses use all of them)."""
    from faker.providers.address.en_US import Provider

    words = set(_EN_TYPES.split("|")) | {w for w in Provider.street_suffixes if w.isalpha()}
    return "|".join(sorted(words, key=len, reverse=True))


def _postcode(regions: tuple[str, ...]) -> str:
    shapes = dict.fromkeys(_POSTCODES.get(r, r"\d{4,6}") for r in regions)
    return "(?:" + "|".join(shapes) + ")"


def _address_patterns(regions: tuple[str, ...]) -> list[re.Pattern[str]]:
    pc = _postcode(regions)
    sep = r"(?:[ \t]*,[ \t]*|[ \t]*\r?\n[ \t]*|[ \t]+)"
    # What may follow a street: a unit, then "City, ST 12345" / "City NW1 6XE" / "12345 City" / "12345, City (XX)".
    place = (rf"{sep}(?:(?:{_CITY})(?:[ \t]*,?[ \t]*[A-Z]{{2}})?(?:[ \t]*,?[ \t]*|[ \t]*\r?\n[ \t]*){pc}|{pc}(?:[ \t]*,?[ \t]*|[ \t]*\r?\n[ \t]*){_CITY}"
             rf"(?:[ \t]*\([A-Z]{{2}}\))?)(?![\w-])")
    tail = rf"{_UNIT}?(?:{place}|{sep}(?:{_CITY})(?=[ \t]*(?:[.;!?]|$)))?"
    tail_required = rf"(?:{_UNIT}(?:{place})?|{place})"
    house = rf"{_NUM_FIRST}[ \t]+(?:(?:N|S|E|W|NE|NW|SE|SW)\.?[ \t]+)?(?:{_SW}[ \t]+){{1,4}}"
    english = rf"{house}(?:{_EN_CORE})\b\.?(?![\w-]){tail}"
    english_other = rf"{house}(?:{_usps_types()})\b\.?(?![\w-]){tail_required}"
    rt = _lead(_ROMANCE_TYPES)
    romance = (rf"{_NUM_FIRST}(?:[ \t]*(?:bis|ter))?[ \t]*,?[ \t]+{rt}(?i:{_ROMANCE_TYPES})[ \t]+(?:{_SW}[ \t]*){{1,5}}"
               rf"(?<=\w){tail}")
    # A street without a house number, closed by a postcode and city ("chemin de Marty, 55284 Sainte Augustin").
    romance_bare = rf"(?<![\w-]){rt}(?i:{_ROMANCE_TYPES})[ \t]+(?:{_SW}[ \t]+){{0,4}}{_SW}(?<=\w){place}"
    romance_after = (rf"(?<![\w-]){rt}(?i:{_ROMANCE_TYPES})[ \t]+(?:{_SW}[ \t]+){{0,4}}{_SW},?[ \t]+"
                     rf"(?:(?:n[º°o]|no|nr|д|дом)\.?[ \t]*)?\d{{1,5}}[A-Za-z]?(?:[-/]\d{{1,5}})?(?![\w-])"
                     rf"(?:[ \t]*(?:к|корп|стр|кв)\.?[ \t]*\d{{1,5}}(?:/\d{{1,4}})?)*{tail}")
    street = rf"(?<![\w-])(?:{_U}[\w'’.\-]*[ \t-])?{_U}[\w'’\-]*"
    number = r"[ \t]+\d{1,5}[ \t]?[a-z]?(?:[-/]\d{1,5}[a-z]?)?(?![\w-])"
    germanic = rf"{street}(?i:{_GERMANIC_CORE}){number}{tail}"
    germanic_other = rf"{street}(?i:{_GERMANIC_SUFFIX}){number}{place}"
    germanic_words = (rf"(?<![\w-])(?:Am|An der|Auf der|Im|In der|Zum|Zur|Unter den|Alte[rs]?|Neue[rs]?)[ \t]+{_U}[\w\-]*"
                      rf"(?:[ \t]+(?i:{_GERMANIC_SUFFIX}))?{number}{tail}")
    po_box = (rf"(?<![\w-])(?i:P\.?[ \t]?O\.?[ \t]?Box|Post[ \t]?Box|Postfach|Apartado(?: de correos)?|Casella postale)"
              rf"[ \t]+\d{{1,6}}{tail}")
    military = (r"(?<![\w-])(?:(?:USNS|USNV|USS|USCGC)[ \t]+[^\n,]{2,40}|(?:PSC|Unit|CMR)[ \t]+\d{3,5},?[ \t]+Box[ \t]+\d{3,5})"
                r"(?:[ \t]*,[ \t]*|[ \t]*\r?\n[ \t]*|[ \t]+)[AFD]PO[ \t]+A[AEP][ \t]+\d{5}")
    # A British flat line with no house number: "Flat 7, Jones Light, North Holly, S6 7LJ"; a house number
    # and street without a type, then town and postcode: "08 Jennifer Park, West Dale, DT7M 6XE".
    flat = (rf"(?<![\w-])(?:Flat|Apartment|Unit|Studio)[ \t]+\d{{1,4}}[A-Za-z]?"
            rf"(?:{sep}{_CITY}){{1,3}}{sep}{pc}(?![\w-])")
    # East Asian addresses: prefecture/province, city, block numbers ("石川県香取市台東29丁目16番13号").
    east_asian = (r"(?:[\u4e00-\u9fff\u3040-\u30ff]{1,4}[都道府県省])?[\u4e00-\u9fff\u3040-\u30ff]{1,8}[市区町村县縣]"
                  r"[\u4e00-\u9fff\u3040-\u30ffA-Za-z0-9]{0,16}?(?:\d{1,4}丁目\d{1,4}番地?\d{1,4}号?|\d{1,4}-\d{1,4}-\d{1,4}|"
                  r"[\u4e00-\u9fff]{1,6}[街路道巷][A-Za-z0-9\u4e00-\u9fff]{0,6}[号座栋室]?)")
    return [re.compile(p) for p in (english, english_other, romance, romance_after, romance_bare, germanic, germanic_other,
                                    germanic_words, po_box, military, flat, east_asian)]


_ADDRESS_HINT = re.compile(r"\d")
# Word endings (punctuation is split off, so "str." is "str") that glued street names end with.
_GLUED_CORE = tuple(x.replace("\\.", "") for x in _GERMANIC_CORE.split("|"))
_GLUED_ALL = tuple(dict.fromkeys(x.replace("\\.", "") for x in _GERMANIC_SUFFIX.split("|")))


class AddressDetector:
    kind = "ADDRESS"

    def __init__(self, regions: tuple[str, ...]) -> None:
        self.patterns = _address_patterns(tuple(r.upper() for r in regions))
        english, english_other, romance, romance_after, romance_bare, germanic, germanic_other, germanic_words, \
            po_box, military, flat, east_asian = self.patterns
        types = _cue_words(_EN_TYPES) | _cue_words(_usps_types())
        romance_types = _cue_words(_ROMANCE_TYPES)
        # Each pattern runs only when the text has a word it needs (a street type, a unit, a box), or for
        # the glued German/Dutch street names a suffix somewhere in the lower-cased text.
        self.gated = [
            (english, types, None), (english_other, types, None), (romance, romance_types, None),
            (romance_after, romance_types, None), (romance_bare, romance_types, None),
            (germanic, None, _GLUED_CORE), (germanic_other, None, _GLUED_ALL),
            (germanic_words, frozenset({"am", "an", "auf", "im", "in", "zum", "zur", "unter", "alte", "alter", "altes",
                                        "neue", "neuer", "neues"}), None),
            (po_box, frozenset({"box", "postfach", "apartado", "casella", "postbox"}), None),
            (military, frozenset({"apo", "fpo", "dpo"}), None),
            (flat, frozenset({"flat", "apartment", "unit", "studio"}), None), (east_asian, None, None),
        ]

    def spans(self, text: str, words: Words | None = None) -> list[tuple[int, int]]:
        if not _ADDRESS_HINT.search(text):
            return []
        words = words or Words(text)
        found = []
        for pattern, triggers, glued in self.gated:
            if triggers is not None and triggers.isdisjoint(words.lower):
                continue
            if glued is not None and not words.ends_with(glued):
                continue
            if pattern is self.patterns[-1] and text.isascii():  # East Asian scripts only
                continue
            found += [m.span() for m in pattern.finditer(text)]
        return [(s, e) for s, e in _merge(found) if _has_letters(text[s:e])]


def _has_letters(s: str) -> bool:
    return sum(c.isalpha() for c in s) >= 3


# ---- dates of birth ------------------------------------------------------------------------------
_MONTHS = (r"jan(?:uary|uar|vier|\.)?|feb(?:ruary|ruar|\.)?|févr(?:ier|\.)?|fevr(?:ier)?|mar(?:ch|\.)?|m[äa]rz|mars|"
           r"apr(?:il|\.)?|avr(?:il|\.)?|may|mai|jun(?:e|i|\.)?|juin|jul(?:y|i|\.)?|juil(?:let|\.)?|aug(?:ust|\.)?|"
           r"août|aout|sep(?:tember|tembre|t\.|\.)?|oct(?:ober|obre|\.)?|okt(?:ober|\.)?|nov(?:ember|embre|\.)?|"
           r"dec(?:ember|\.)?|dez(?:ember|\.)?|déc(?:embre|\.)?|enero|febrero|marzo|abril|mayo|junio|julio|agosto|"
           r"septiembre|octubre|noviembre|diciembre|gennaio|febbraio|aprile|maggio|giugno|luglio|settembre|ottobre|"
           r"dicembre|janvier|février")
_DATE_VALUE = (rf"(?:\d{{4}}[-./]\d{{1,2}}[-./]\d{{1,2}}|\d{{1,2}}[-./]\d{{1,2}}[-./]\d{{2,4}}|"
               rf"\d{{1,2}}(?:st|nd|rd|th|er|\.)?[ \t]+(?:of[ \t]+|de[ \t]+)?(?i:{_MONTHS})[ \t]*,?[ \t]*(?:de[ \t]+)?\d{{4}}|"
               rf"(?i:{_MONTHS})[ \t]+\d{{1,2}}(?:st|nd|rd|th)?,?[ \t]+\d{{4}}|(?<=born in )\d{{4}})")
_BIRTH_CUE = (r"date of birth|birth ?date|birthday|d\.?o\.?b\.?|born(?:[ \t]+on)?|born in|b\.|geburtsdatum|geboren(?:[ \t]+am)?|"
              r"geb\.|n[ée]e?(?:[ \t]+le)?|date de naissance|fecha de nacimiento|nacid[oa](?:[ \t]+el)?|"
              r"data di nascita|nat[oa](?:[ \t]+il)?|geboortedatum|geboren op|data de nascimento|дата рождения")
_DOB = re.compile(rf"\b{_lead(_BIRTH_CUE)}(?i:(?:{_BIRTH_CUE}))[ \t]*(?:[:\-–][ \t]*)?(?i:(?:is|was|on|the|am|le|el|il)[ \t]+)?(?P<v>{_DATE_VALUE})(?!\d)")

# ---- id numbers ----------------------------------------------------------------------------------
_ID_CUE = (r"passport|passport[ \t]+(?:no|number|num|nr)|reisepass(?:nummer)?|pass(?:nummer|-?nr\.?)|personalausweis(?:nummer)?|"
           r"ausweis(?:nummer|-?nr\.?)?|id[ \t]+(?:no|number|num|nr|card(?:[ \t]+(?:no|number))?)|national[ \t]+id(?:[ \t]+(?:no|number))?|"
           r"identity[ \t]+(?:card|number|document)(?:[ \t]+(?:no|number))?|identification[ \t]+number|"
           r"driver['’]?s?[ \t]+licen[cs]e(?:[ \t]+(?:no|number))?|driving[ \t]+licen[cs]e(?:[ \t]+(?:no|number))?|"
           r"licen[cs]e[ \t]+(?:no|number)|führerschein(?:nummer)?|ni[ \t]+(?:no|number)|national[ \t]+insurance(?:[ \t]+(?:no|number))?|"
           r"nino|social[ \t]+security(?:[ \t]+(?:no|number))?|tax[ \t]+id|tax[ \t]+(?:no|number)|tin|steuer-?id|"
           r"steuer-?identifikationsnummer|steuernummer|sozialversicherungsnummer|numéro[ \t]+de[ \t]+passeport|"
           r"passeport|carte[ \t]+d['’]identité|numéro[ \t]+de[ \t]+sécurité[ \t]+sociale|n°[ \t]+de[ \t]+sécurité[ \t]+sociale|"
           r"pasaporte|dni|nie|nif|documento[ \t]+de[ \t]+identidad|passaporto|carta[ \t]+d['’]identità|codice[ \t]+fiscale|"
           r"paspoort(?:nummer)?|bsn|burgerservicenummer|personnummer|pesel|cpf|aadhaar|pan|medical[ \t]+record[ \t]+(?:no|number)|"
           r"mrn|patient[ \t]+(?:id|no|number)|member[ \t]+(?:id|no|number)|policy[ \t]+(?:no|number)|insurance[ \t]+(?:id|no|number)|"
           r"health[ \t]+(?:card|insurance)[ \t]+(?:no|number)|nhs[ \t]+(?:no|number)|паспорт")
_ID_VALUE = r"(?P<v>(?=[A-Z0-9 -]*\d[A-Z0-9 -]*\d)[A-Z0-9](?:[A-Z0-9]|[ -](?=[A-Z0-9])){4,19})(?![\w-])"
_ID_AFTER_CUE = _Narrowed(_ID_CUE, rf"\b(?i:CUES)\.?[ \t]*(?i:(?:no|nr|num|number|#|n°|nº)\.?[ \t]*)?(?:[:#\-–][ \t]*)?"
                           rf"(?i:(?:is|was|ist|est|es|è)[ \t]+)?{_ID_VALUE}")
_DNI = re.compile(r"(?<![\w-])(?P<v>(?:[XYZ]-?)?\d{7,8}-?[A-Z])(?![\w-])")
_CF_CORE = re.compile(r"\d\d[A-EHLMPRST]\d\d[A-Z]\d{3}[A-Z]")  # pre-scan: the digits-first middle of a code
# Starts with its character class (not a look-behind) so ``re`` can skip ahead to candidate letters.
_CODICE_FISCALE = re.compile(r"[A-Z](?<![\w-][A-Z])[A-Z]{5}\d{2}[A-EHLMPRST]\d{2}[A-Z]\d{3}[A-Z](?![\w-])")
_NIR = re.compile(r"(?<![\w-])[12][ \t]?\d{2}[ \t]?(?:0[1-9]|1[0-2]|[2-9]\d)[ \t]?(?:\d{2}|2A|2B)[ \t]?\d{3}[ \t]?\d{3}[ \t]?\d{2}(?![\w-])")
_NINO = re.compile(r"(?<![\w-])(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z][ \t]?\d{2}[ \t]?\d{2}[ \t]?\d{2}[ \t]?[A-D](?![\w-])")


def dni_ok(value: str) -> bool:
    s = value.replace("-", "")
    body = s[:-1].replace("X", "0").replace("Y", "1").replace("Z", "2")
    return body.isdigit() and "TRWAGMYFPDXBNJZSQVHLCKE"[int(body) % 23] == s[-1]


_CF_ODD = [1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10, 22, 25, 24, 23]


def codice_fiscale_ok(value: str) -> bool:
    total = 0
    for i, c in enumerate(value[:15]):
        n = int(c) if c.isdigit() else ord(c) - 65
        total += _CF_ODD[n] if i % 2 == 0 else n
    return chr(65 + total % 26) == value[15]


def nir_ok(value: str) -> bool:
    s = value.replace(" ", "").replace("\t", "")
    body = s[:13].replace("2A", "19").replace("2B", "18")
    return body.isdigit() and 97 - int(body) % 97 == int(s[13:])


# Parcel tracking numbers (UPS 1Z..., and 2-letter + 9 digits + 2-letter S10 postal items): not personal data.
_UPS = re.compile(r"(?<![\w-])1Z[ \t]?[0-9A-Z]{3}[ \t]?[0-9A-Z]{3}[ \t]?[0-9A-Z]{2}[ \t]?[0-9A-Z]{4}[ \t]?[0-9A-Z]{3,4}(?![\w-])")
_S10 = re.compile(r"[A-Z](?<![\w-][A-Z])[A-Z][ \t]?\d{3}[ \t]?\d{3}[ \t]?\d{3}[ \t]?[A-Z]{2}(?![\w-])")


_DIGIT = re.compile(r"\d")


def _has_digit(text: str) -> bool:
    return _DIGIT.search(text) is not None


def early_detectors(id_numbers: bool = True) -> list[Detector]:
    """What runs before the card, IBAN and phone detectors: tracking numbers (kept, so no part of one is
    taken for a phone) and the checksummed national ids (a French NIR can pass Luhn: its key decides)."""
    has_digit = _has_digit
    out = [Detector("TRACKING", _UPS, lambda t: "1Z" in t, keep=True),
           Detector("TRACKING", _S10, has_digit, keep=True)]
    if id_numbers:
        # DNI, NIR and NINO hold 6+ digits in a run (separators allowed): skipped unless the text has one.
        out += [Detector("ID_NUMBER", _DNI, has_digit, lambda m: dni_ok(m.group("v")), needs_digit_run=True),
                Detector("ID_NUMBER", _CODICE_FISCALE, lambda t: _CF_CORE.search(t) is not None,
                         lambda m: codice_fiscale_ok(m.group())),
                Detector("ID_NUMBER", _NIR, has_digit, lambda m: nir_ok(m.group()), needs_digit_run=True),
                Detector("ID_NUMBER", _NINO, has_digit, needs_digit_run=True)]
    return out


class IdAfterCue:
    """An id number after the name of its document ("passport H87366851", "NI number QQ 12 34 56 C")."""

    kind = "ID_NUMBER"

    def spans(self, text: str, words: Words | None = None) -> list[tuple[int, int]]:
        if not _has_digit(text):
            return []
        pattern = _ID_AFTER_CUE.pattern(words or Words(text))
        return [m.span("v") for m in pattern.finditer(text)] if pattern is not None else []


def cue_detectors(dates_of_birth: bool = True, id_numbers: bool = True) -> list:
    """Values known by the words before them: a date of birth, an id number after its name."""
    return ([Detector("DOB", _DOB, _has_digit, triggers=_cue_words(_BIRTH_CUE) | {"dob", "d"})] if dates_of_birth
            else []) + ([IdAfterCue()] if id_numbers else [])
