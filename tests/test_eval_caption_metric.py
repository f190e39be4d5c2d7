"""Caption metrics against hand-worked values: COCO tokenisation, corpus BLEU (torchmetrics), CIDEr-D (ours)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from vlm.evaluation.caption_metric import bleu, caption_scores, cider_d, coco_tokenize


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("A man's hat.", ["a", "man", "'s", "hat"]),
        ("Dogs don't play, (really) \"here\"!", ["dogs", "do", "n't", "play", "really", "here"]),
        ("A black-and-white photo of 3.5 cats...", ["a", "black-and-white", "photo", "of", "3.5", "cats"]),
        ("  Two\tcats;  one: dog  ", ["two", "cats", "one", "dog"]),
    ],
)
def test_coco_tokenisation(text: str, tokens: list[str]) -> None:
    assert coco_tokenize(text) == tokens


def test_bleu4_hand_worked_corpus() -> None:
    preds = ["the cat sat on the mat", "a dog runs on the grass"]
    refs = [["the cat is on the mat", "there is a cat on the mat"], ["a dog runs on the grass"]]
    # clipped matches / candidate n-grams summed over both sentences:
    # 1-grams (5 + 6) / 12, 2-grams (3 + 5) / 10, 3-grams (1 + 4) / 8, 4-grams (0 + 3) / 6; c = r = 12, BP = 1
    expected = (11 / 12 * 8 / 10 * 5 / 8 * 3 / 6) ** 0.25
    assert bleu(preds, refs) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.691892, abs=1e-6)


def test_bleu_brevity_penalty() -> None:
    # "the cat": both unigrams and the bigram match; c = 2, r = 6 -> BP = exp(1 - 6/2)
    assert bleu(["the cat"], [["the cat sat on the mat"]], n=2) == pytest.approx(math.exp(-2), abs=1e-6)
    # no 4-gram at all: BLEU-4 is 0 (no smoothing)
    assert bleu(["the cat"], [["the cat sat on the mat"]]) == 0.0


def test_bleu_length_tie_takes_the_shorter_reference() -> None:
    """5 tokens between references of 6 and 4: the standard takes 4 (c > r, BP 1); torchmetrics alone takes 6."""
    from torchmetrics.functional.text import bleu_score

    pred, refs = ["a b c d e"], [["a b c d e f", "a b c d"]]
    assert bleu(pred, refs) == pytest.approx(1.0)
    assert float(bleu_score(pred, refs)) == pytest.approx(math.exp(1 - 6 / 5), abs=1e-6)  # why we sort


def _textbook_bleu(preds: list[list[str]], refs: list[list[list[str]]], n: int = 4) -> float:
    """Papineni et al. 2002 written out directly, to check the torchmetrics path on random corpora."""
    matches, totals, c, r = [0] * n, [0] * n, 0, 0
    for hyp, rs in zip(preds, refs):
        c += len(hyp)
        r += min((abs(len(x) - len(hyp)), len(x)) for x in rs)[1]
        for k in range(1, n + 1):
            grams = Counter(tuple(hyp[i : i + k]) for i in range(len(hyp) - k + 1))
            best: Counter = Counter()
            for x in rs:
                best |= Counter(tuple(x[i : i + k]) for i in range(len(x) - k + 1))
            matches[k - 1] += sum(min(v, best[g]) for g, v in grams.items())
            totals[k - 1] += sum(grams.values())
    if min(matches) == 0:
        return 0.0
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(sum(math.log(m / t) for m, t in zip(matches, totals)) / n)


def test_torchmetrics_bleu_equals_the_textbook_corpus_bleu() -> None:
    rng = random.Random(0)
    words = "a b c d e f".split()
    for _ in range(20):
        preds, refs = [], []
        for _ in range(rng.randint(1, 5)):
            preds.append([rng.choice(words) for _ in range(rng.randint(4, 9))])
            refs.append([[rng.choice(words) for _ in range(rng.randint(3, 10))] for _ in range(rng.randint(1, 4))])
        got = bleu([" ".join(p) for p in preds], [[" ".join(x) for x in rs] for rs in refs])
        assert got == pytest.approx(_textbook_bleu(preds, refs), abs=1e-6)


def test_cider_d_hand_worked() -> None:
    """Two images, so idf = log 2 - log df with df = 1 for every reference n-gram (and max(1, 0) for the rest).

    Image 1, "a b" vs "a b": cosine 1 for 1- and 2-grams, 0 for 3/4-grams (empty) -> 10 * (1 + 1) / 4 = 5.
    Image 2, "c d" vs "c e": 1-grams share c -> 1/2, bigrams nothing -> 10 * 0.5 / 4 = 1.25. Corpus: 3.125.
    """
    corpus, per_caption = cider_d(["a b", "c d"], [["a b"], ["c e"]])
    assert per_caption == pytest.approx([5.0, 1.25])
    assert corpus == pytest.approx(3.125)


def test_cider_d_two_references_and_length_penalty() -> None:
    """Image 1, "a b c" against "a b" and "a c" (all weights equal, so cosines of raw counts):
    vs "a b": 1-grams 2/sqrt(3*2), bigrams 1/sqrt(2*1); vs "a c": 1-grams 2/sqrt(6). Bigram counts 2 vs 1 -> each
    reference is penalised by exp(-1 / 72). Score 10 * exp(-1/72) * (4/sqrt 6 + 1/sqrt 2) / 4 / 2.
    Image 2, "d" vs "d": 1-gram cosine 1 -> 10 / 4 = 2.5.
    """
    corpus, per_caption = cider_d(["a b c", "d"], [["a b", "a c"], ["d"]])
    first = 10 * math.exp(-1 / 72) * (4 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 / 2
    assert per_caption == pytest.approx([first, 2.5])
    assert corpus == pytest.approx((first + 2.5) / 2)
    assert first == pytest.approx(2.884779, abs=1e-6)


def test_cider_d_clips_repeated_ngrams() -> None:
    """"a a" against "a b": the repeated a counts as min(2w, w) * w, not 2w * w, so it cannot beat "a b"."""
    _, repeated = cider_d(["a a", "x"], [["a b"], ["x"]])
    _, exact = cider_d(["a b", "x"], [["a b"], ["x"]])
    assert repeated[0] < exact[0]


def test_caption_scores_tokenise_before_scoring() -> None:
    metrics, per_caption = caption_scores(["A dog runs on the grass.", "The cat sat on the mat!"],
                                          [["a dog runs on the grass"], ["The cat sat on the mat."]])
    assert metrics["bleu4"] == pytest.approx(1.0)
    assert metrics["bleu1"] == pytest.approx(1.0)
    assert metrics["cider_d"] == pytest.approx(sum(per_caption) / 2) and metrics["cider_d"] > 0
