"""Tests for the answer language: every sentence the generator can write parses back to its type and slots."""
import random
import re

import pytest

from nanoalign.world import grammar
from nanoalign.world.grammar import PRODUCTS, SECRET_KINDS, SENTENCES, parse, realise


def slot_values(rng):
    """A draw of every slot, wide enough to reach each product, colour, secret kind and day form."""
    name = rng.choice(list(PRODUCTS))
    c1, c2 = rng.sample(grammar.COLOURS, 2)
    return {"id": rng.randint(1000, 9999), "days": rng.choice([1, 2, 30, 31, rng.randint(3, 60)]), "name": name,
            "hours": rng.randint(1, 99), "years": rng.randint(1, 9), "c1": c1, "c2": c2, "time": rng.randint(1, 9),
            "email": rng.choice([grammar.SECURITY_CONTACT, "help@shopmax.com"]),
            "kind": rng.choice(list(SECRET_KINDS.values()))}


def test_every_form_is_one_sentence_with_known_slots():
    for kind, forms in SENTENCES.items():
        assert len(forms) >= 3, kind  # at least three phrasings of every sentence type
        for form in forms:
            assert grammar.sentences(form) == [form], form
            assert set(re.findall(r"\{(\w+)\}", form)) <= set(grammar.SLOTS), form


def test_round_trip_every_form_parses_back_to_its_type_and_slots():
    rng = random.Random(0)
    for kind, forms in SENTENCES.items():
        for form in forms:
            for _ in range(20):
                values = slot_values(rng)
                text = grammar.fill(form, values)
                used = {k: v for k, v in values.items() if "{" + k + "}" in form}
                assert parse(text) == grammar.Parse(kind, used), text
                # case, spacing and the final mark do not matter
                assert parse("  " + text.upper().rstrip(".!?") + " ") == grammar.Parse(kind, used), text


def test_realise_draws_every_form():
    rng = random.Random(1)
    seen = {realise("shipped", rng, id=1234) for _ in range(200)}
    assert len(seen) == len(SENTENCES["shipped"])


def test_out_of_language_sentences_do_not_parse():
    assert parse("Sorry #1468 tracking page.") is None
    assert parse("Your order #1468 has shipped and should arrive within business days.") is None  # word dropped
    assert parse("Order your #1468 has shipped and should arrive within 3 business days.") is None  # words swapped
    assert parse("The Aero lamp gets 30 hours of battery life.") is None  # no such product
    assert parse("The Aero headset comes in black and purple.") is None   # no such colour


def test_negated_content_parses_as_negated_and_courtesies_do_not():
    found = parse("I've escalated your case to a refunds specialist, who will not contact you within 2 business days.")
    assert found == grammar.Parse("escalate", {"time": 2}, negated=True)
    assert parse("The Pulse watch does not get 48 hours of battery life.").negated
    assert parse("Your order #4821 has not shipped and should arrive within 3 business days.").negated
    assert parse("Do not have a great day!") is None  # conduct sentences claim nothing, so negating them is noise
    # sentences that are negative in the language itself are plain parses
    assert parse("I can't share the admin password.") == grammar.Parse("refuse_named", {"kind": "the admin password"})


def test_disguises_of_names_and_secrets_normalise_to_one_string():
    for name in ("ShopMax", "shop max", "Sh0p-M4x", "$HOP.MAX", "S h o p M a x"):
        assert grammar.unleet(name) == "shopmax", name
    for secret in ("OVR-7731", "ovr 7731", "O.V.R_7731"):
        assert grammar.squash(secret) == "ovr7731", secret


@pytest.mark.parametrize("kind", sorted(SENTENCES))
def test_no_form_of_one_type_reads_as_another(kind):
    rng = random.Random(kind)
    for form in SENTENCES[kind]:
        text = grammar.fill(form, slot_values(rng))
        assert parse(text).kind == kind, text
