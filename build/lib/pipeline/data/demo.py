"""Deterministic demo data: customer-support tickets -> JSON triage answers, in chat ``messages`` JSONL.

The files it writes are committed under ``data/raw/`` so a fresh clone needs no remote; a test checks
that regenerating them gives the same bytes. Like real exports, the training file carries PII (emails,
phone numbers, card numbers), exact and near duplicates and a few malformed lines, so the sanitize stage
has real work to do.

    python -m pipeline.data.demo            # rewrites data/raw/tickets_{train,eval}.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CATEGORIES = ("billing", "technical", "account", "shipping")
PRIORITIES = ("high", "low")

_ISSUES = {
    "billing": [
        "I was charged twice for my last order",
        "my invoice shows the wrong amount",
        "the refund for order {order} never arrived",
        "my subscription renewed at a higher price than advertised",
        "there is a payment on my statement I do not recognise",
        "the discount code was not applied to my bill",
        "I need a copy of the invoice for order {order}",
        "my card was declined but the money left my account",
    ],
    "technical": [
        "the app crashes every time I open the settings page",
        "I cannot connect the device to my wifi network",
        "the dashboard shows an error 500 after the update",
        "sync stopped working on version {version}",
        "the export button does nothing in the browser",
        "notifications are not arriving on my phone",
        "the firmware update failed halfway through",
        "pages load extremely slowly since this morning",
    ],
    "account": [
        "I cannot log in even after resetting my password",
        "please change the email address on my profile",
        "I want to close my account and delete my data",
        "two factor authentication codes are not accepted",
        "my account was locked after too many attempts",
        "I need to add a second user to our team plan",
        "the username on my profile is spelled wrong",
        "I never received the verification email",
    ],
    "shipping": [
        "my parcel for order {order} has not arrived yet",
        "the tracking number shows no updates for a week",
        "the package arrived damaged",
        "I received the wrong item in my delivery",
        "can I change the delivery address for order {order}",
        "the courier left my parcel at the wrong address",
        "part of my order is missing from the box",
        "delivery was promised for monday but nothing came",
    ],
}

_URGENCY = {
    "high": [
        "This is urgent, please help immediately.",
        "I need this fixed today, it is blocking our whole team.",
        "Please treat this as urgent.",
        "This is critical for us and cannot wait.",
        "We are losing money every hour this continues.",
        "Please escalate this right away.",
    ],
    "low": [
        "No rush, whenever you have a moment.",
        "Just a small question, it is not urgent.",
        "Take your time, this can wait until next week.",
        "Not a big deal, just letting you know.",
        "Whenever convenient, thanks.",
        "Low priority, only curious.",
    ],
}

_GREETINGS = ["Hi,", "Hello support,", "Hello,", "Dear team,", "Hey there,", "Good morning,", "Good afternoon,",
              "Hi folks,", "To whom it may concern,", ""]
# Context sentences real tickets carry; they are label-neutral and make tickets differ the way real
# ones do, so near-duplicate detection has true and false candidates to tell apart.
_DETAILS = [
    "I am using the {product} on {device}.",
    "This started {when}.",
    "I already tried {action} but nothing changed.",
    "We are on the {plan} plan with {seats} seats.",
    "My customer number is CUST-{num}.",
    "I have been a customer for {years} years.",
    "It happens on {device} as well as on my laptop.",
    "Our office is in {city}.",
    "A colleague of mine noticed it {when} too.",
    "I contacted you about something else {when}.",
    "The {product} otherwise works fine for us.",
    "I read the help article about {topic} first.",
]
_SLOTS = {
    "product": ["Acme Hub", "Acme Hub Pro", "SyncBox", "the mobile app", "the web portal", "TaskFlow", "the desktop client"],
    "device": ["an iPhone 14", "a Pixel 8", "Windows 11", "macOS Sonoma", "an iPad", "Ubuntu 24.04", "a Galaxy S23"],
    "when": ["yesterday", "this morning", "last week", "two days ago", "after the weekend", "on Friday", "an hour ago"],
    "action": ["restarting", "logging out and in", "clearing the cache", "reinstalling", "a different browser",
               "the troubleshooting guide"],
    "plan": ["Starter", "Business", "Enterprise", "Family", "Pro"],
    "city": ["Berlin", "Austin", "Lyon", "Manchester", "Toronto", "Madrid", "Osaka", "Melbourne"],
    "topic": ["refunds", "passwords", "deliveries", "invoices", "syncing", "accounts"],
}
_NAMES = ["Alice Martin", "Bob Chen", "Carla Diaz", "Dev Patel", "Emma Novak", "Farid Haddad",
          "Grace Kim", "Hugo Silva", "Ines Moreau", "Jonas Berg"]
_DOMAINS = ["example.com", "mail.example.org", "corp.example.net"]
# Test card numbers that pass the Luhn check, as real leaked numbers would.
_CARDS = ["4111 1111 1111 1111", "5500-0000-0000-0004", "4012888888881881", "3782 822463 10005"]


def _phone(rng: random.Random) -> str:
    return rng.choice([
        f"+1 415 555 {rng.randint(1000, 9999)}",
        f"+44 20 7946 {rng.randint(1000, 9999)}",
        f"(212) 555-{rng.randint(1000, 9999)}",
        f"+49 30 {rng.randint(1000000, 9999999)}",
    ])


def _contact_line(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    user = name.lower().replace(" ", ".")
    kind = rng.random()
    if kind < 0.35:
        return f"You can reach me at {user}@{rng.choice(_DOMAINS)}."
    if kind < 0.65:
        return f"Call me back on {_phone(rng)}."
    if kind < 0.8:
        return f"The card I used is {rng.choice(_CARDS)}."
    return f"Thanks, {name}"


def _ticket(rng: random.Random, category: str, priority: str, pii: bool) -> str:
    issue = rng.choice(_ISSUES[category]).format(
        order=f"ORD-{rng.randint(10000, 99999)}",
        version=f"{rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}",
    )
    parts = [rng.choice(_GREETINGS), issue[0].upper() + issue[1:] + "."]
    for detail in rng.sample(_DETAILS, rng.randint(1, 2)):
        parts.append(detail.format(**{k: rng.choice(v) for k, v in _SLOTS.items()},
                                   seats=rng.randint(2, 500), num=rng.randint(100000, 999999),
                                   years=rng.randint(1, 12)))
    parts.append(rng.choice(_URGENCY[priority]))
    if pii:
        parts.append(_contact_line(rng))
    return " ".join(p for p in parts if p)


def answer(category: str, priority: str) -> str:
    """The canonical assistant answer: compact JSON with a fixed key order."""
    return json.dumps({"category": category, "priority": priority})


def _record(rng: random.Random, pii_rate: float) -> dict:
    category = rng.choice(CATEGORIES)
    priority = rng.choice(PRIORITIES)
    text = _ticket(rng, category, priority, rng.random() < pii_rate)
    return {"messages": [{"role": "user", "content": text},
                         {"role": "assistant", "content": answer(category, priority)}]}


def _near_duplicate(rng: random.Random, rec: dict) -> dict:
    """Same ticket re-sent with different casing and spacing, as users and exports do."""
    text = rec["messages"][0]["content"]
    variant = rng.choice([text.upper(), "  " + text.replace(" ", "  ") + " ", text.lower()])
    return {"messages": [{"role": "user", "content": variant}, dict(rec["messages"][1])]}


_MALFORMED = [
    '{"messages": [{"role": "user", "content": "My order never came"}, {"role": "assistant", "content": ',
    '{"messages": [{"role": "user", "content": "I was charged twice, please refund"}]}',
    '{"messages": [{"role": "customer", "content": "Hello?"}, {"role": "assistant", "content": "{}"}]}',
    '{"messages": []}',
    '{"prompt_text": "wrong schema entirely"}',
    '{"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "{\\"category\\": \\"billing\\", \\"priority\\": \\"low\\"}"}]}',
    'this line is not json at all',
]


def generate(n_train: int = 900, n_eval: int = 120, seed: int = 1234) -> tuple[list[str], list[str]]:
    """Return the train and eval files as lists of JSONL lines (no trailing newline)."""
    rng = random.Random(seed)
    train = [_record(rng, pii_rate=0.3) for _ in range(n_train)]
    eval_ = [_record(rng, pii_rate=0.3) for _ in range(n_eval)]
    lines = [json.dumps(r, ensure_ascii=False) for r in train]
    # Exact duplicates (re-exported rows) and near duplicates (re-sent tickets).
    for _ in range(n_train // 25):
        lines.append(json.dumps(rng.choice(train), ensure_ascii=False))
    for _ in range(n_train // 30):
        lines.append(json.dumps(_near_duplicate(rng, rng.choice(train)), ensure_ascii=False))
    lines.extend(_MALFORMED)
    rng.shuffle(lines)
    return lines, [json.dumps(r, ensure_ascii=False) for r in eval_]


_CAPITALS = {"France": "Paris", "Germany": "Berlin", "Japan": "Tokyo", "Canada": "Ottawa", "Italy": "Rome",
             "Spain": "Madrid", "Kenya": "Nairobi", "Brazil": "Brasilia", "Egypt": "Cairo", "Norway": "Oslo",
             "Peru": "Lima", "India": "New Delhi", "Australia": "Canberra", "Mexico": "Mexico City"}


def generate_generic(n: int = 300, seed: int = 99) -> list[str]:
    """Generic instruction data (arithmetic, capitals, spelling) mixed into training to limit forgetting."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.4:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            q, ans = f"What is {a} plus {b}?", str(a + b)
        elif kind < 0.7:
            country = rng.choice(sorted(_CAPITALS))
            q, ans = f"What is the capital of {country}?", _CAPITALS[country]
        else:
            word = rng.choice(["parcel", "invoice", "account", "refund", "support", "delivery", "password"])
            q, ans = f"Spell the word {word} backwards.", word[::-1]
        lines.append(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]}))
    return lines


_WORDS = ["river", "garden", "window", "silver", "lantern", "meadow", "harbor", "pencil", "orbit", "candle",
          "forest", "marble", "thunder", "violet", "canyon", "beacon", "saddle", "walnut", "glacier", "puzzle"]


def generate_regression(n: int = 80, seed: int = 4242) -> list[str]:
    """Generic prompts the fine-tune never sees, scored on the base and each candidate to catch forgetting:
    copying, looking a value up, arithmetic and reversing words absent from the generic training mix."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            span = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 6)))
            q, ans = f"Repeat: {span}", span
        elif kind == 1:
            keys = rng.sample(_WORDS, 3)
            values = [str(rng.randint(100, 9999)) for _ in keys]
            k = rng.randrange(3)
            pairs = "\n".join(f"{a}: {b}" for a, b in zip(keys, values))
            q, ans = f"{pairs}\nWhat is the value of {keys[k]}?", values[k]
        elif kind == 2:
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            q, ans = f"What is {a} plus {b}?", str(a + b)
        else:
            word = rng.choice(_WORDS)
            q, ans = f"Spell the word {word} backwards.", word[::-1]
        lines.append(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]}))
    return lines


def generate_preferences(n: int = 400, seed: int = 7) -> list[str]:
    """DPO pairs: the correct triage answer is chosen, a plausible wrong one rejected."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        category, priority = rng.choice(CATEGORIES), rng.choice(PRIORITIES)
        wrong = rng.choice([(c, priority) for c in CATEGORIES if c != category] +
                           [(category, p) for p in PRIORITIES if p != priority])
        lines.append(json.dumps({"prompt": _ticket(rng, category, priority, pii=False),
                                 "chosen": answer(category, priority), "rejected": answer(*wrong)}))
    return lines


def write(out_dir: str | Path = "data/raw") -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, eval_ = generate()
    files = {"tickets_train.jsonl": train, "tickets_eval.jsonl": eval_,
             "generic_chat.jsonl": generate_generic(), "tickets_preference.jsonl": generate_preferences(),
             "generic_regression.jsonl": generate_regression()}
    for name, lines in files.items():
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [out / name for name in files]


if __name__ == "__main__":
    for p in write():
        print(f"wrote {p}")
