"""A synthetic sentiment corpus, generated from a seed: the default when no data is given.

Each example is a short review: neutral sentences (distractors) around one verdict clause such as
``the plot was not really good``. The label is the verdict word's polarity, flipped by a negation
(``not``, ``never``, ``n't``) that may stand a few words before it. The verdict sits anywhere in the
text, so a model must notice the negation, carry it to the verdict word, and carry the result to
the end of the sequence; word counts alone (a bag of words) cannot separate ``not good`` from
``not bad`` when both words appear in both classes.
"""

from __future__ import annotations

import random

__all__ = ["synthetic_reviews"]

POSITIVE = [
    "good",
    "great",
    "excellent",
    "wonderful",
    "brilliant",
    "superb",
    "enjoyable",
    "delightful",
    "moving",
    "clever",
    "charming",
    "gripping",
]
NEGATIVE = [
    "bad",
    "awful",
    "terrible",
    "boring",
    "dull",
    "poor",
    "weak",
    "tedious",
    "clumsy",
    "forgettable",
    "bland",
    "messy",
]
SUBJECTS = [
    "the movie",
    "the film",
    "the plot",
    "the acting",
    "the script",
    "the ending",
    "the cast",
    "the soundtrack",
    "the dialogue",
    "the story",
    "the direction",
    "the second half",
]
# (plain verb, negated forms of it)
VERBS = [
    ("was", ["was not", "wasn't", "was never"]),
    ("is", ["is not", "isn't", "is never"]),
    ("seemed", ["did not seem", "didn't seem", "never seemed"]),
    ("felt", ["did not feel", "didn't feel", "never felt"]),
]
INTENSIFIERS = ["", "", "very", "really", "truly", "particularly", "quite", "all that", "especially"]
DISTRACTORS = [
    "i saw it on a sunday with my sister",
    "we went to the late show",
    "it runs about two hours",
    "the theater was almost full",
    "my friend picked the seats",
    "the trailer came out last spring",
    "it was shot in three different countries",
    "there is a long scene in a train station",
    "the lead actor also wrote the book",
    "i had read about it in the paper",
    "we bought popcorn and two drinks",
    "it is based on a true story",
    "the director made two films before this one",
    "most of it takes place in a small town",
    "the credits roll over a map of the city",
    "i watched it again at home later",
    "the music was written by a new composer",
    "my parents came along this time",
    "it opens with a wedding",
    "the main character works in a bakery",
]


def _review(rng: random.Random) -> tuple[str, int]:
    positive = rng.random() < 0.5
    negated = rng.random() < 0.5
    word = rng.choice(POSITIVE if positive else NEGATIVE)
    verb, negations = rng.choice(VERBS)
    verb = rng.choice(negations) if negated else verb
    verdict = " ".join(w for w in (rng.choice(SUBJECTS), verb, rng.choice(INTENSIFIERS), word) if w)
    sentences = rng.sample(DISTRACTORS, rng.randint(0, 4))
    sentences.insert(rng.randint(0, len(sentences)), verdict)
    label = int(positive != negated)
    return ". ".join(sentences) + ".", label


def synthetic_reviews(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` reviews and their labels (1 positive, 0 negative), the same for the same ``seed``."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        text, label = _review(rng)
        texts.append(text)
        labels.append(label)
    return texts, labels
