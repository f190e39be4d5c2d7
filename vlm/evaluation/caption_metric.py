"""Caption metrics against several references: BLEU-n (torchmetrics) and CIDEr-D (our own; torchmetrics has none).

Both see COCO-style tokens: lower case, PTB-like splitting of clitics ("dog's" -> "dog 's", "don't" -> "do n't"),
and the punctuation tokens that the COCO caption evaluation removes after its Java PTBTokenizer dropped. (Not
the Java tokenizer itself: rare inputs such as URLs may split differently.)

BLEU is corpus-level (Papineni et al.): clipped n-gram counts and lengths summed over the corpus, brevity
penalty against the reference length closest to each candidate, the shorter on a tie. torchmetrics picks the
*first* closest reference on a tie, so references are sorted by length before they reach it. pycocoevalcap's
Bleu adds 1e-9/1e-15 guards to each precision; it agrees with this to ~1e-9 unless some precision is zero.

CIDEr-D follows pycocoevalcap's `cider_scorer.py`: n = 1..4 TF-IDF vectors (document frequency over the
reference sets of the corpus, idf = log(#images) - log(max(1, df))), clipped cosine similarity per n, a Gaussian
penalty on the difference of the bigram counts (sigma 6), averaged over n and references, times 10.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

# The tokens pycocoevalcap's PTBTokenizer wrapper removes (quotes and brackets as the Java tokenizer writes them).
COCO_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                    "...", ";"}
_BRACKETS_AND_QUOTES = set("()[]{}\"")
_CLITICS = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-'./&]\w+)*|\.\.\.|--|\S")


def coco_tokenize(text: str) -> list[str]:
    """COCO caption-evaluation tokens: lower case, clitics split, punctuation removed."""
    text = _CLITICS.sub(r"\1 \2", " ".join(str(text).lower().split()))
    return [t for t in _TOKEN.findall(text) if t not in COCO_PUNCTUATION and t not in _BRACKETS_AND_QUOTES]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> float:
    """Corpus BLEU-n of whitespace-tokenised strings (torchmetrics, references sorted for the tie rule)."""
    from torchmetrics.functional.text import bleu_score

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    ordered = [sorted(refs, key=lambda r: len(r.split())) for refs in references]
    return float(bleu_score(list(predictions), ordered, n_gram=n, smooth=False))


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-caption scores) of whitespace-tokenised strings; the corpus score is the mean.

    Document frequencies come from the references of all captions given, so a corpus of one image scores 0
    (log 1 = 0): score a whole test set at once.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every caption needs at least one reference")
    hyp_counts = [_ngrams(p.split(), n) for p in predictions]
    ref_counts = [[_ngrams(r.split(), n) for r in refs] for refs in references]
    document_frequency: Counter = Counter()
    for refs in ref_counts:
        document_frequency.update(set().union(*refs))
    log_images = math.log(float(len(references))) if references else 0.0

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = tf * (log_images - math.log(max(1.0, document_frequency[gram])))
            norm[k] += vec[k][gram] ** 2
        bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)  # pycocoevalcap's "length"
        return vec, [math.sqrt(x) for x in norm], bigrams

    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        vec, norm, length = vector(hyp)
        total = 0.0
        for ref in refs:
            rvec, rnorm, rlength = vector(ref)
            penalty = math.exp(-((length - rlength) ** 2) / (2 * sigma**2))
            for k in range(n):
                value = sum(min(w, rvec[k].get(g, 0.0)) * rvec[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] and rnorm[k]:
                    value /= norm[k] * rnorm[k]
                total += value * penalty
        scores.append(10.0 * total / n / len(refs))
    return (sum(scores) / len(scores) if scores else 0.0), scores


def caption_scores(predictions: Sequence[str],
                   references: Sequence[Sequence[str]]) -> tuple[dict[str, float], list[float]]:
    """COCO-tokenise, then BLEU-1..4 and CIDEr-D; returns (metrics without a task prefix, per-caption CIDEr-D)."""
    preds = [" ".join(coco_tokenize(p)) for p in predictions]
    refs = [[" ".join(coco_tokenize(r)) for r in rs] for rs in references]
    cider, per_caption = cider_d(preds, refs)
    metrics = {f"bleu{k}": bleu(preds, refs, n=k) for k in range(1, 5)}
    metrics["cider_d"] = cider
    return metrics, per_caption
