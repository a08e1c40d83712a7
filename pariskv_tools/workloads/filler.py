"""Haystack text for the synthetic tasks: seeded, digit-free filler sentences.

Digit-free so that a task's numbers (passkeys, needle values) are unique in the prompt;
drawn from word lists with a caller's ``random.Random``, so the same seed always gives the
same text.
"""

from __future__ import annotations

import random

# Two filler styles, both digit-free so needles stay unique:
#
# * "simple" (default): short descriptive sentences over a small vocabulary ("The river is
#   calm. Here we go."), in the spirit of the classic passkey filler but drawn at random
#   rather than cycled, so keys are not exact periodic copies. SmolLM2-135M retrieves a
#   passkey through ~8K tokens of it.
# * "narrative": longer varied sentences about people and places. More natural text, but
#   at ~8K tokens SmolLM2-135M loses needles placed early (it answers with the first two
#   digits), so it is opt-in for experiments that want a harder, more realistic haystack.

FILLERS = ("simple", "narrative")


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split("|"))


_SIMPLE_NOUNS = _words("grass|sky|sun|sea|road|house|tree|river|stone|cloud|field|door")
_SIMPLE_ADJS = _words("green|blue|yellow|calm|long|old|tall|wide|grey|white|quiet|warm")
_SIMPLE_EXTRA = _words("Here we go.|There and back again.|The day goes on.|Nothing happens.")

_SUBJECTS = _words(
    "the old fisherman|a quiet librarian|the village baker|my neighbour|the young painter|"
    "a travelling merchant|the river guide|an elderly farmer|the school teacher|a curious child|"
    "the ship captain|the gardener|a tired shepherd|the night watchman|our cousin|the tailor|"
    "a wandering poet|the blacksmith|the mayor|a retired sailor"
)
_VERBS = _words(
    "walked along|looked at|talked about|dreamed of|painted|repaired|cleaned|sold|described|"
    "remembered|visited|admired|photographed|ignored|measured|carried|followed|studied|"
    "sketched|wrote about"
)
_OBJECTS = _words(
    "the wooden bridge|a basket of apples|the stone wall|the lighthouse|an empty barn|"
    "the marketplace|a field of wheat|the narrow street|the copper kettle|a broken fence|"
    "the orchard|the harbour|a flock of geese|the chapel bell|a pile of firewood|"
    "the mountain path|the windmill|a row of cottages|the village square|the frozen lake"
)
_TIMES = _words(
    "in the morning|after lunch|before sunset|late at night|during the storm|on a cold day|"
    "in early spring|at the end of summer|on market day|at dawn|while it rained|"
    "under a grey sky|in the autumn|at midday|on the first warm evening"
)
_COMMENTS = _words(
    "Nobody was in a hurry.|The air smelled of rain and cut grass.|It was an ordinary day.|"
    "Birds circled slowly overhead.|A dog barked somewhere far away.|The wind was gentle.|"
    "Everything felt calm and familiar.|Smoke rose from a distant chimney.|"
    "The clouds moved slowly towards the hills.|Children laughed near the fountain.|"
    "The road was dusty and quiet.|A cart rattled past the gate.|The grass was still wet."
)
_TEMPLATES = (
    "{S} {V} {O} {T}.",
    "{T}, {s} {V} {O}.",
    "{S} {V} {O}, and then {s2} {V2} {O2}.",
    "{S} {V} {O} {T}. {C}",
    "Some say that {s} once {V} {O} {T}.",
    "{C} {S} {V} {O}.",
)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _simple_sentence(rng: random.Random) -> str:
    if rng.random() < 0.25:
        return rng.choice(_SIMPLE_EXTRA)
    return f"The {rng.choice(_SIMPLE_NOUNS)} is {rng.choice(_SIMPLE_ADJS)}."


def _narrative_sentence(rng: random.Random) -> str:
    subj = rng.choice(_SUBJECTS)
    text = rng.choice(_TEMPLATES).format(
        S=_cap(subj),
        s=subj,
        s2=rng.choice(_SUBJECTS),
        V=rng.choice(_VERBS),
        V2=rng.choice(_VERBS),
        O=rng.choice(_OBJECTS),
        O2=rng.choice(_OBJECTS),
        T=rng.choice(_TIMES),
        C=rng.choice(_COMMENTS),
    )
    return _cap(text)


def filler_sentence(rng: random.Random, style: str = "simple") -> str:
    """One random filler sentence of the given style (see ``FILLERS``)."""
    if style == "simple":
        return _simple_sentence(rng)
    if style == "narrative":
        return _narrative_sentence(rng)
    raise ValueError(f"unknown filler style {style!r}; choose one of {FILLERS}")
