"""Detectors: property-based recall on generated values, precision on look-alikes that must survive."""

import ipaddress

import pytest
from faker import Faker
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.pii import iban_ok, luhn_ok, make_redactor, redact

fake = Faker(["en_US", "en_GB", "de_DE", "fr_FR"])
Faker.seed(7)


def _cards():
    return st.sampled_from(["visa", "mastercard", "amex", "discover"]).map(
        lambda kind: fake.credit_card_number(card_type=kind))


def _gap(s):
    """Join two sentences around a value so word boundaries are realistic."""
    return st.tuples(st.sampled_from(["Here: ", "value ", "(", "- "]), st.just(s), st.sampled_from([" thanks", ".", ")", ""]))


@settings(max_examples=80, deadline=None)
@given(user=st.emails())
def test_any_email_is_redacted(user):
    out, counts = redact(f"write to {user} today")
    assert user not in out and counts["EMAIL"] == 1


@settings(max_examples=60, deadline=None)
@given(card=_cards(), sep=st.sampled_from(["", " ", "-"]))
def test_luhn_valid_cards_are_redacted_in_common_groupings(card, sep):
    grouped = sep.join(card[i:i + 4] for i in range(0, len(card), 4))
    out, counts = redact(f"my card {grouped} expires soon")
    assert counts == {"CARD": 1} and card[-4:] not in out


@settings(max_examples=60, deadline=None)
@given(digits=st.text(alphabet="0123456789", min_size=16, max_size=16))
def test_luhn_invalid_sixteen_digit_numbers_are_not_cards(digits):
    out, counts = redact(f"reference {digits[:4]} {digits[4:8]} {digits[8:12]} {digits[12:]}")
    assert ("CARD" in counts) == luhn_ok(digits)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_ibans_are_redacted_and_checksums_matter(seed):
    fake.seed_instance(seed)
    iban = fake.iban()
    assert iban_ok(iban)
    out, counts = redact(f"please pay to {iban} by friday")
    assert counts["IBAN"] == 1 and iban not in out
    broken = iban[:2] + f"{(int(iban[2:4]) + 1) % 100:02d}" + iban[4:]
    assert "IBAN" not in redact(f"please pay to {broken} by friday")[1]


@settings(max_examples=40, deadline=None)
@given(ip=st.ip_addresses())
def test_ip_addresses_are_redacted(ip):
    if ip.is_unspecified or (ip.version == 6 and str(ip).count(":") < 3):
        return
    out, counts = redact(f"request from {ip} failed")
    assert counts == {"IP_ADDRESS": 1} and str(ip) not in out


@pytest.mark.parametrize("locale", ["en_US", "en_GB", "de_DE", "fr_FR"])
def test_phone_numbers_from_the_configured_regions(locale):
    f = Faker(locale)
    f.seed_instance(3)
    misses = []
    for _ in range(40):
        number = f.phone_number()
        out, counts = redact(f"call me on {number} please")
        if counts.get("PHONE") != 1:
            misses.append(number)
    assert len(misses) <= 1, misses


@pytest.mark.parametrize("text, kind", [
    ("key AKIAIOSFODNN7EXAMPLE in the log", "AWS_ACCESS_KEY"),
    ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U ok", "JWT"),
    ("Authorization: Bearer 9f8e7d6c5b4a39281706f5e4d3c2b1a0", "BEARER_TOKEN"),
    ("db at postgres://admin:s3cr3t@db.internal:5432/app", "URL_CREDENTIALS"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----", "PRIVATE_KEY"),
    ("my ssn is 123-45-6789", "SSN"),
])
def test_secrets_and_ids(text, kind):
    out, counts = redact(text)
    assert counts == {kind: 1}, (out, counts)


def test_structure_around_secrets_is_kept():
    assert redact("Authorization: Bearer 9f8e7d6c5b4a39281706f5e4d3c2b1a0")[0] == "Authorization: Bearer <TOKEN>"
    assert redact("postgres://admin:s3cr3t@db:5432/app")[0] == "postgres://<CREDENTIALS>@db:5432/app"


@pytest.mark.parametrize("text", [
    "Order ORD-48192 is late", "Version 1.20.3 broke sync", "Build 2024.11.3 and 10.2.1", "Invoice 2024-03-15",
    "Paid $1,299.00 on 03/15/2024", "Ticket #123456 reopened", "ticket INC-0012345 and case 00123456",
    "ISBN 978-3-16-148410-0", "at 13:45:00 UTC", "Card-like but fails Luhn: 4111 1111 1111 1112",
    "SSN-shaped but invalid: 000-12-3456 and 666-12-3456", "port 8080, pid 12345, 3.14159", "fe80::1 and ::1",
    "model gpt-4o-2024-08-06", "sha 9f8e7d6c5b4a3928", "room 4.102, floor 3",
    # dates, times and timestamps
    "deployed at 2026-03-02 14:05 UTC", "on 2026-03-02T14:05:33Z", "release 2026-03-02 14:05:33.123",
    "log 2026/03/02 14:05", "at 14:05 on 02.03.2026", "timestamp 1709388300", "run 20260302-140533",
    # build and version numbers
    "build 20260302.1405 is green", "build 2026.03.02.1405", "version 10.0.19045.3803", "v2.14.3-rc1",
    # ISBNs, tracking numbers, order and ticket ids
    "ISBN 0-306-40615-2", "ISBN 978-0-306-40615-7", "tracking 1Z999AA10123456784", "FedEx 7489 2300 1234",
    "USPS 9400 1000 0000 0000 0000 00", "order #123-4567890-1234567", "order ORD-2026-000123", "ref 4820119933",
    "ticket INC0012345", "JIRA-12345", "invoice INV-2026-03-0042", "serial SN-4820-1199-3381",
    "order #279-4794634-4794634", "run 20120204-176350",
])
def test_look_alikes_survive(text):
    assert redact(text) == (text, {})


@pytest.mark.parametrize("text", ["call me on 4155552671", "my phone: 02079460000", "+44 20 7946 0000",
                                  "(415) 555-2671", "415.555.2671", "01 23 45 67 89"])
def test_phones_still_found_next_to_those_shapes(text):
    assert redact(text)[1] == {"PHONE": 1}, redact(text)


def test_custom_detector():
    r = make_redactor(custom={"employee": r"\bEMP-\d{5}\b"})
    assert redact("ask EMP-12345", r) == ("ask <EMPLOYEE>", {"EMPLOYEE": 1})


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and not iban_ok("DE88 3704 0044 0532 0130 00")
    assert ipaddress.ip_address("10.0.0.1")
