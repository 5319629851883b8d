"""Caption metrics on hand-built captions whose answers are worked out here."""

from __future__ import annotations

import math

import pytest

from jobs import caption_metrics as cm


def test_tokenize_lowercases_and_strips_punctuation():
    assert cm.tokenize("A Man's dog, running!  (fast)") == ["a", "mans", "dog", "running", "fast"]
    assert cm.normalize("  A red circle. ") == "a red circle"
    assert cm.tokenize("") == []


def test_collapsed_greedy_captions_are_one_unique_and_flagged():
    greedy = ["A man is standing on a snowboard."] * 40
    assert cm.unique_captions(greedy) == (1, 2.5)
    assert cm.collapse_verdict(greedy) == "collapsed"
    # punctuation / case variants are the same caption
    assert cm.unique_captions(["a dog", "A dog.", "a cat"]) == (2, pytest.approx(200 / 3))


def test_collapse_threshold_and_small_sets():
    diverse = [f"caption number {i}" for i in range(10)]
    assert cm.collapse_verdict(diverse) == "ok"
    # 2 distinct out of 100 = 2% < 5%
    assert cm.collapse_verdict(["a"] * 99 + ["b"]) == "collapsed"
    # 6 distinct out of 100 = 6% >= 5%
    assert cm.collapse_verdict([str(i % 6) for i in range(100)]) == "ok"
    # one caption for two images is collapse even though 1/2 = 50% unique
    assert cm.collapse_verdict(["same", "same"]) == "collapsed"
    assert cm.collapse_verdict(["only one image"]) == "ok"


def test_vocabulary_and_length():
    assert cm.vocabulary(["a red circle", "A blue circle"]) == {"a", "red", "blue", "circle"}
    assert cm.average_length(["a red circle", "two words"]) == 2.5
    assert cm.average_length([]) == 0.0


def test_word_overlap_is_share_of_reference_words_averaged_over_references():
    # refs: {a, dog, on, grass} -> gen has a, dog: 2/4; {the, dog, runs} -> dog: 1/3
    value = cm.word_overlap(["a dog"], [["a dog on grass", "the dog runs"]])
    assert value == pytest.approx((2 / 4 + 1 / 3) / 2)
    # second image overlaps fully; images are averaged
    value = cm.word_overlap(["a dog", "red"], [["a dog on grass"], ["red"]])
    assert value == pytest.approx((0.5 + 1.0) / 2)


def test_content_match_needs_a_shared_visual_word():
    refs = [["two dogs on the grass", "a cat on a mat"]]
    # "dogs" (plural) shared with the first reference only -> 1/2 for this image
    assert cm.content_match(["some dogs"], refs) == pytest.approx(0.5)
    # function words never count
    assert cm.content_match(["on the"], refs) == 0.0
    # colours count: the shapes vocabulary matches
    assert cm.content_match(["a red square"], [["a red circle"]]) == 1.0
    assert {"man", "dogs", "red", "two", "large", "riding"} <= cm.CONTENT_WORDS


def test_exact_match_after_normalisation():
    gen = ["A red circle.", "a blue square", "a red square"]
    refs = [["a red circle"], ["a blue triangle", "A blue square"], ["a green square"]]
    assert cm.exact_match(gen, refs) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 generated captions but 1 reference"):
        cm.exact_match(["a", "b"], [["a"]])


def test_bleu4_is_one_for_identical_captions_and_lower_otherwise():
    refs = [["a man riding a wave on a surfboard"], ["two dogs playing with a frisbee in the park"]]
    same = [r[0] for r in refs]
    assert cm.bleu4(same, refs) == pytest.approx(1.0, abs=1e-6)
    assert cm.bleu4(["a man riding a horse on a beach", "a cat sleeping on a couch"], refs) < 0.5


def test_cider_d_prefers_the_matching_reference():
    refs = [
        ["a man riding a wave on a surfboard", "a surfer rides a large wave"],
        ["two dogs playing with a frisbee in the park", "dogs chase a frisbee on the grass"],
        ["a plate of food with broccoli and rice", "a meal of rice and vegetables on a plate"],
    ]
    matched = ["a man riding a wave on a surfboard", "two dogs playing with a frisbee", "a plate of rice and broccoli"]
    swapped = [matched[1], matched[2], matched[0]]
    good, bad = cm.cider_d(matched, refs), cm.cider_d(swapped, refs)
    assert good > 1.0 > bad >= 0.0
    # a single image has idf log(1) - log(1) = 0 everywhere: documented as 0
    assert cm.cider_d(matched[:1], refs[:1]) == 0.0


def test_images_without_references_are_skipped_by_reference_metrics():
    refs = [["a red circle"], []]
    assert cm.bleu4(["a red circle", "anything"], refs) == cm.bleu4(["a red circle"], refs[:1])
    assert cm.word_overlap(["a red circle", "x"], refs) == 1.0


def test_keyword_category_votes_across_captions():
    names = cm.KEYWORD_CATEGORY_NAMES
    assert len(names) == 20 and names[0] == "person" and names[-1] == "outdoor"
    caps = ["A man riding a horse", "a horse in a field", "Two horses grazing"]
    assert names[cm.keyword_category(caps)] == "horse"  # 3 horse votes beat 1 person, 1 outdoor
    # tie between person and dog (one caption each) goes to the earlier category
    assert names[cm.keyword_category(["a woman", "a puppy"])] == "person"
    assert names[cm.keyword_category(["Giraffes eating leaves."])] == "giraffe"
    assert cm.keyword_category(["a red circle"]) is None
    assert cm.keyword_category([]) is None


def test_caption_report_has_the_logs_metrics():
    refs = [["a red circle"], ["a blue square"], ["a green triangle"], ["a red square"]]
    greedy = ["a red circle"] * 4
    sampled = ["a red circle", "a blue square", "a green triangle", "a pink dog"]
    report = cm.caption_report(greedy, refs, sampled)
    assert report["num_images"] == 4
    assert report["greedy_unique"] == 1 and report["collapse"] is True
    assert report["collapse_verdict"] == "collapsed"
    assert report["exact_match_pct"] == 25.0
    assert report["sampled_unique"] == 4 and report["sampled_unique_pct"] == 100.0
    assert report["sampled_exact_match_pct"] == 75.0
    assert report["greedy_unique_words"] == 3 and report["reference_unique_words"] == 7
    assert report["greedy_avg_length"] == 3.0 and report["sampled_avg_length"] == 3.0
    # content match: red shared with images 0 and 3 -> 2/4
    assert report["greedy_content_match_pct"] == 50.0
    assert not math.isnan(report["cider_d"]) and 0.0 <= report["bleu4"] <= 1.0
