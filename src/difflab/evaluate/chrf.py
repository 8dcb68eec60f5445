"""chrF, the character n-gram F-score of a text against a reference (Popović 2015).

For each order ``n = 1..N`` (``N = 6``) count the character n-grams of the hypothesis and of
the reference, whitespace removed; ``m_n`` is the size of their multiset intersection, and the
precision and recall are ``P_n = m_n / |hyp n-grams|`` and ``R_n = m_n / |ref n-grams|``. Then

    F_n = (1 + beta^2) P_n R_n / (beta^2 P_n + R_n),     chrF = 100 mean_n F_n

over the orders at which both texts have n-grams (``F_n = 0`` when ``m_n = 0``; ``beta = 2``
weighs recall more, as the metric's authors chose). A corpus score sums the counts over its
pairs before dividing, as BLEU does. Written for this library and checked against counts by
hand (tests/test_continuous_text.py), not against another implementation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

#: The highest character n-gram order and the weight of recall.
ORDER = 6
BETA = 2.0


def _ngrams(text: str, n: int) -> Counter[str]:
    chars = "".join(text.split())
    return Counter(chars[i : i + n] for i in range(len(chars) - n + 1))


def statistics(hypothesis: str, reference: str) -> list[tuple[int, int, int]]:
    """``(hyp n-grams, ref n-grams, matches)`` for each order ``n = 1..ORDER``."""
    stats = []
    for n in range(1, ORDER + 1):
        hyp, ref = _ngrams(hypothesis, n), _ngrams(reference, n)
        stats.append((sum(hyp.values()), sum(ref.values()), sum((hyp & ref).values())))
    return stats


def score(stats: Sequence[tuple[int, int, int]]) -> float:
    """chrF in ``[0, 100]`` of summed :func:`statistics` (0 when no order has n-grams on both
    sides)."""
    values = []
    for hyp, ref, match in stats:
        if hyp == 0 or ref == 0:
            continue
        p, r = match / hyp, match / ref
        values.append(0.0 if match == 0 else (1 + BETA**2) * p * r / (BETA**2 * p + r))
    return 100.0 * sum(values) / len(values) if values else 0.0


def sentence_chrf(hypothesis: str, reference: str) -> float:
    """chrF of one text against one reference."""
    return score(statistics(hypothesis, reference))


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """chrF of a corpus: the counts of every pair summed, then scored."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    total = [[0, 0, 0] for _ in range(ORDER)]
    for h, r in zip(hypotheses, references, strict=True):
        for acc, stat in zip(total, statistics(h, r), strict=True):
            for j in range(3):
                acc[j] += stat[j]
    return score([(a, b, c) for a, b, c in total])


def minimum_bayes_risk(candidates: Sequence[str]) -> int:
    """The index of the candidate with the highest mean chrF against the others (minimum Bayes
    risk decoding with ``1 - chrF`` as the risk; the first on ties)."""
    if len(candidates) == 1:
        return 0
    means = [
        sum(sentence_chrf(c, o) for j, o in enumerate(candidates) if j != i) for i, c in
        enumerate(candidates)
    ]  # fmt: skip
    return max(range(len(candidates)), key=lambda i: (means[i], -i))
