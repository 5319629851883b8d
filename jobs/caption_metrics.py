"""Caption metrics: the research log's diagnostics plus BLEU-4 and CIDEr-D.

Everything here is a pure function over plain Python lists, so the numbers can be checked
by hand in tests and recomputed from a saved report:

    generated  : list[str]        one caption per image
    references : list[list[str]]  every reference caption of the same image

Text is compared after `tokenize`: lowercase, punctuation stripped, split on whitespace.
That stands in for coco-caption's PTBTokenizer, which needs Java; it differs only on
clitics ("man's" -> "mans" here, "man 's" there), so BLEU/CIDEr can drift slightly from
official server figures but are comparable between our own runs.

CIDEr-D. pycocoevalcap's `Cider` is the coco-caption implementation, and reading
`pycocoevalcap/cider/cider_scorer.py` shows it is CIDEr-D, not the original CIDEr:
tf-idf n-gram vectors (n = 1..4) with idf computed from the references of the images being
scored, the hypothesis tf-idf clipped to the reference's (`min(vec_hyp, vec_ref)`), a
Gaussian length penalty exp(-delta^2 / (2 * sigma^2)) with sigma = 6, the mean over n,
averaged over references and multiplied by 10. (A quirk kept from coco-caption: the length in
the penalty is counted in bigrams, i.e. words - 1, which leaves delta unchanged for captions of
two words or more.) Two consequences: the score depends on the set of images scored together
(idf), and a single image scores 0 (idf = log(1) - log(1)).

BLEU-4 is pycocoevalcap's corpus-level BLEU with the "closest" reference length. A
caption shorter than 4 words has no 4-grams, so the shapes set ("a red circle") scores
~0 on BLEU-4 even when every caption is exact: use `exact_match_pct` there.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

COLLAPSE_THRESHOLD = 0.05  # greedy captions below 5% unique -> "collapsed"

_PUNCT = re.compile(r"[^\w\s]|_")


def tokenize(text: str) -> list[str]:
    """Lowercase words with punctuation removed; apostrophes vanish ("don't" -> "dont")."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    return _PUNCT.sub(" ", text).split()


def normalize(text: str) -> str:
    """The canonical form captions are compared in (for uniqueness and exact match)."""
    return " ".join(tokenize(text))


def _plural_forms(words: Sequence[str]) -> frozenset[str]:
    """Each word plus its regular plural, so 'dogs' matches 'dog' without a stemmer."""
    out = set(words)
    for w in words:
        out.add(w + "es" if w.endswith(("s", "sh", "ch", "x")) else w + "s")
    return frozenset(out)


# ---------------------------------------------------------------------------
# Content words: the log's "fixed list of common visual words".

CONTENT_WORD_GROUPS: dict[str, tuple[str, ...]] = {
    "people": (
        "man", "men", "woman", "women", "person", "people", "boy", "girl", "child", "children",
        "kid", "baby", "player", "lady", "guy", "skier", "surfer", "skateboarder", "crowd",
    ),
    "animals": (
        "dog", "puppy", "cat", "kitten", "horse", "bird", "cow", "sheep", "elephant", "giraffe",
        "zebra", "bear", "animal", "duck", "pigeon",
    ),
    "vehicles": (
        "car", "bus", "truck", "train", "bike", "bicycle", "motorcycle", "airplane", "plane", "jet",
        "boat", "ship", "vehicle", "van", "taxi", "scooter",
    ),
    "colours": (
        "red", "blue", "green", "yellow", "white", "black", "brown", "orange", "purple", "pink",
        "gray", "grey", "silver",
    ),
    "counts": ("one", "two", "three", "four", "five", "several", "many", "group", "couple", "pair", "few"),
    "sizes": ("large", "small", "big", "little", "tall", "huge", "tiny", "giant", "long", "short"),
    "actions": (
        "sitting", "standing", "walking", "riding", "holding", "playing", "eating", "flying",
        "running", "laying", "lying", "looking", "driving", "parked", "carrying", "jumping",
        "swimming", "skiing", "surfing", "throwing", "grazing", "waiting", "talking", "cutting",
    ),
}  # fmt: skip
CONTENT_WORDS: frozenset[str] = _plural_forms([w for group in CONTENT_WORD_GROUPS.values() for w in group])


# ---------------------------------------------------------------------------
# The log's 20 keyword categories (Run 2's classification probe), in the log's order.

KEYWORD_CATEGORIES: dict[str, tuple[str, ...]] = {
    "person": (
        "person", "people", "man", "men", "woman", "women", "boy", "girl", "child", "children",
        "kid", "baby", "lady", "guy", "player",
    ),
    "dog": ("dog", "puppy"),
    "cat": ("cat", "kitten", "kitty"),
    "vehicle": ("car", "bus", "truck", "motorcycle", "bike", "bicycle", "vehicle", "van", "taxi", "scooter"),
    "bird": ("bird", "pigeon", "seagull", "duck", "parrot", "goose", "geese"),
    "horse": ("horse", "pony"),
    "food": (
        "food", "pizza", "sandwich", "cake", "donut", "doughnut", "banana", "broccoli", "meal",
        "fruit", "vegetable", "salad", "dessert",
    ),
    "airplane": ("airplane", "plane", "jet", "aircraft", "airliner"),
    "boat": ("boat", "ship", "sailboat", "kayak", "canoe"),
    "train": ("train", "locomotive"),
    "elephant": ("elephant",),
    "giraffe": ("giraffe",),
    "zebra": ("zebra",),
    "sheep": ("sheep", "lamb"),
    "cow": ("cow", "cattle", "bull", "calf"),
    "bear": ("bear",),
    "surfboard": ("surfboard", "surfer", "surfing", "surf"),
    "sports": (
        "tennis", "baseball", "frisbee", "skateboard", "skateboarder", "ski", "skier", "skiing",
        "snowboard", "snowboarder", "soccer", "ball", "racket", "bat", "kite",
    ),
    "furniture": ("chair", "couch", "sofa", "bed", "table", "bench", "desk", "furniture"),
    "outdoor": (
        "street", "road", "field", "beach", "park", "grass", "sky", "mountain", "hill", "sidewalk",
        "building", "city", "outdoor", "outside",
    ),
}  # fmt: skip
KEYWORD_CATEGORY_NAMES: tuple[str, ...] = tuple(KEYWORD_CATEGORIES)
_KEYWORD_SETS: tuple[frozenset[str], ...] = tuple(_plural_forms(kws) for kws in KEYWORD_CATEGORIES.values())


def keyword_category(captions: Sequence[str]) -> int | None:
    """Index into KEYWORD_CATEGORY_NAMES voted by an image's captions, or None if no keyword occurs.

    Each caption votes once for every category it mentions; the most-voted category wins and
    ties go to the earlier category in the log's order (so "person" wins a tie).
    """
    votes = Counter()
    for caption in captions:
        words = set(tokenize(caption))
        for index, keywords in enumerate(_KEYWORD_SETS):
            if words & keywords:
                votes[index] += 1
    if not votes:
        return None
    return min(votes, key=lambda index: (-votes[index], index))


# ---------------------------------------------------------------------------
# The log's diagnostics.


def _check_pairs(generated: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generated captions but {len(references)} reference lists")


def unique_captions(captions: Sequence[str]) -> tuple[int, float]:
    """(distinct captions after normalisation, percentage of the number of captions)."""
    if not captions:
        return 0, 0.0
    count = len({normalize(c) for c in captions})
    return count, 100.0 * count / len(captions)


def collapse_verdict(greedy: Sequence[str], threshold: float = COLLAPSE_THRESHOLD) -> str:
    """Return "collapsed" when greedy captions are < threshold unique (or one caption for all images), else "ok"."""
    count, pct = unique_captions(greedy)
    collapsed = len(greedy) > 1 and (count == 1 or pct < 100.0 * threshold)
    return "collapsed" if collapsed else "ok"


def vocabulary(captions: Sequence[str]) -> set[str]:
    return {w for c in captions for w in tokenize(c)}


def average_length(captions: Sequence[str]) -> float:
    """Mean caption length in words."""
    return sum(len(tokenize(c)) for c in captions) / len(captions) if captions else 0.0


def word_overlap(generated: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean share of a reference's distinct words that the generation contains, in [0, 1].

    Averaged over each image's references, then over images: the expectation of the log's
    figure, which compared against one reference per image.
    """
    _check_pairs(generated, references)
    per_image = []
    for gen, refs in zip(generated, references, strict=True):
        gen_words = set(tokenize(gen))
        shares = [len(set(r) & gen_words) / len(set(r)) for r in map(tokenize, refs) if r]
        if shares:
            per_image.append(sum(shares) / len(shares))
    return sum(per_image) / len(per_image) if per_image else 0.0


def content_match(generated: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Share of images where a CONTENT_WORDS word occurs in both reference and generation, in [0, 1].

    Per image, the share of its references that share a content word with the generation,
    averaged over images (again the expectation of the log's one-reference figure).
    """
    _check_pairs(generated, references)
    per_image = []
    for gen, refs in zip(generated, references, strict=True):
        if not refs:
            continue
        gen_content = set(tokenize(gen)) & CONTENT_WORDS
        hits = [bool(gen_content & set(tokenize(r))) for r in refs]
        per_image.append(sum(hits) / len(hits))
    return sum(per_image) / len(per_image) if per_image else 0.0


def exact_match(generated: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Share of images whose normalised generation equals one of its normalised references, in [0, 1]."""
    _check_pairs(generated, references)
    if not generated:
        return 0.0
    hits = sum(normalize(g) in {normalize(r) for r in refs} for g, refs in zip(generated, references, strict=True))
    return hits / len(generated)


# ---------------------------------------------------------------------------
# Standard captioning metrics through pycocoevalcap.


def _coco_inputs(
    generated: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """pycocoevalcap's {id: [sentences]} dicts, pre-tokenised; images without references are skipped."""
    _check_pairs(generated, references)
    gts, res = {}, {}
    for i, (gen, refs) in enumerate(zip(generated, references, strict=True)):
        if refs:
            gts[i] = [normalize(r) for r in refs]
            res[i] = [normalize(gen)]
    return gts, res


def bleu4(generated: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 against all references of each image, in [0, 1]."""
    from pycocoevalcap.bleu.bleu import Bleu

    gts, res = _coco_inputs(generated, references)
    if not gts:
        return 0.0
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(scores[3])


def cider_d(generated: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D (pycocoevalcap's Cider: sigma 6, clipped tf-idf, x10); 0 for fewer than 2 images."""
    from pycocoevalcap.cider.cider import Cider

    gts, res = _coco_inputs(generated, references)
    if len(gts) < 2:
        return 0.0
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def caption_report(
    greedy: Sequence[str], references: Sequence[Sequence[str]], sampled: Sequence[str] | None = None
) -> dict[str, float | int | str | bool]:
    """All caption metrics of one split, flat; percentages are 0-100, BLEU in [0, 1], CIDEr-D x10 scale."""
    _check_pairs(greedy, references)
    n = len(greedy)
    greedy_unique, greedy_pct = unique_captions(greedy)
    ref_words = vocabulary([r for refs in references for r in refs])
    verdict = collapse_verdict(greedy)
    out: dict[str, float | int | str | bool] = {
        "num_images": n,
        "greedy_unique": greedy_unique,
        "greedy_unique_pct": greedy_pct,
        "greedy_unique_words": len(vocabulary(greedy)),
        "reference_unique_words": len(ref_words),
        "greedy_avg_length": average_length(greedy),
        "reference_avg_length": average_length([r for refs in references for r in refs]),
        "greedy_word_overlap_pct": 100.0 * word_overlap(greedy, references),
        "greedy_content_match_pct": 100.0 * content_match(greedy, references),
        "exact_match_pct": 100.0 * exact_match(greedy, references),
        "bleu4": bleu4(greedy, references),
        "cider_d": cider_d(greedy, references),
        "collapse_verdict": verdict,
        "collapse": verdict == "collapsed",
    }
    if sampled is not None:
        _check_pairs(sampled, references)
        sampled_unique, sampled_pct = unique_captions(sampled)
        out.update(
            sampled_unique=sampled_unique,
            sampled_unique_pct=sampled_pct,
            sampled_unique_words=len(vocabulary(sampled)),
            sampled_avg_length=average_length(sampled),
            sampled_word_overlap_pct=100.0 * word_overlap(sampled, references),
            sampled_content_match_pct=100.0 * content_match(sampled, references),
            sampled_exact_match_pct=100.0 * exact_match(sampled, references),
        )
    return out
