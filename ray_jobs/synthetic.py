"""The project's synthetic movie reviews (data.source: synthetic): offline, labelled, reproducible, for the
quickstart and the tests. Deterministic, varied, and not solvable by counting positive words alone:
negation flips a phrase, "X, but Y" makes Y decide, mixed reviews end on their verdict.
"""

from __future__ import annotations

import random

_SUBJECTS = [
    "the acting",
    "the plot",
    "the script",
    "the soundtrack",
    "the cinematography",
    "the pacing",
    "the dialogue",
    "the ending",
    "the lead actor",
    "the supporting cast",
    "the direction",
    "the special effects",
    "the story",
    "the humour",
    "the editing",
    "the villain",
    "the score",
    "the costumes",
    "the first half",
    "the final act",
]
_POS = [
    "good",
    "great",
    "excellent",
    "wonderful",
    "superb",
    "brilliant",
    "moving",
    "charming",
    "clever",
    "gripping",
    "beautiful",
    "delightful",
    "memorable",
    "fantastic",
    "engaging",
    "touching",
    "solid",
]
_NEG = [
    "bad",
    "awful",
    "terrible",
    "boring",
    "dull",
    "weak",
    "clumsy",
    "predictable",
    "tedious",
    "painful",
    "forgettable",
    "lazy",
    "messy",
    "bland",
    "disappointing",
    "poor",
    "lifeless",
]
_INTENSIFIERS = ["", "", "", "very ", "really ", "truly ", "incredibly ", "quite ", "absolutely ", "rather "]
_FILLER = [
    "I watched it on a rainy sunday.",
    "My friend recommended it last week.",
    "It runs a little over two hours.",
    "The trailer gave away a few scenes.",
    "I saw it in a small cinema downtown.",
    "It is based on a novel.",
    "The director made two films before this one.",
    "The theatre was half empty.",
    "I went in knowing nothing.",
]
_POS_VERDICT = [
    "I loved it.",
    "Highly recommended.",
    "I would happily watch it again.",
    "One of the best films this year.",
    "Ten out of ten.",
    "Go and see it.",
    "It was worth every minute.",
    "A real gem.",
]
_NEG_VERDICT = [
    "I hated it.",
    "Avoid it.",
    "I want my two hours back.",
    "One of the worst films this year.",
    "Two out of ten.",
    "Skip this one.",
    "It was a waste of time.",
    "A real mess.",
]


def _phrase(rng: random.Random, positive: bool) -> str:
    """A clause about one aspect whose sentiment is `positive`; sometimes stated through negation."""
    subject = rng.choice(_SUBJECTS)
    intensifier = rng.choice(_INTENSIFIERS)
    if rng.random() < 0.25:  # negated opposite word: "not boring" is positive
        word = rng.choice(_NEG if positive else _POS)
        neg = rng.choice(
            ["not", "never", "hardly", "not at all"] if positive else ["not", "not really", "hardly", "never"]
        )
        if neg == "not at all":
            return f"{subject} was not {word} at all"
        return f"{subject} was {neg} {word}"
    word = rng.choice(_POS if positive else _NEG)
    return f"{subject} was {intensifier}{word}"


def _review(rng: random.Random, positive: bool) -> str:
    kind = rng.random()
    sentences: list[str] = []
    if rng.random() < 0.4:
        sentences.append(rng.choice(_FILLER))
    if kind < 0.35:  # contrast: the clause after "but" carries the label
        sentences.append(f"{_phrase(rng, not positive).capitalize()}, but {_phrase(rng, positive)}.")
    elif kind < 0.6:  # mixed review that ends on its verdict
        sentences.append(f"{_phrase(rng, not positive).capitalize()}.")
        sentences.append(f"{_phrase(rng, positive).capitalize()} and {_phrase(rng, positive)}.")
        sentences.append(rng.choice(_POS_VERDICT if positive else _NEG_VERDICT))
    else:
        for _ in range(rng.randint(1, 3)):
            sentences.append(f"{_phrase(rng, positive).capitalize()}.")
        if rng.random() < 0.5:
            sentences.append(rng.choice(_POS_VERDICT if positive else _NEG_VERDICT))
    if rng.random() < 0.2:
        sentences.append(rng.choice(_FILLER))
    return " ".join(sentences)


def reviews(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """`n` reviews and their labels (1 positive), balanced, reproducible from `seed`."""
    rng = random.Random(seed)
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    return [_review(rng, bool(y)) for y in labels], labels
