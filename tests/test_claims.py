"""The book's verdict rules (book.claims), on values where the answer is known."""

import pytest

from book.claims import lens_comparison, lens_verdict, size_comparison, size_verdict

UNIFORM = 0.29  # a latent spread evenly over many layers: std / layers about 1 / sqrt(12)


def stats(std_rel: float, ratio: float) -> dict[str, float]:
    return {"layer std / layers": std_rel, "aggregated / per-token variance": ratio}


def test_lens_comparison_similar_when_findings_agree_and_spreads_are_close():
    table, similar = lens_comparison({"plain": stats(0.05, 30.0), "tuned lens": stats(0.08, 12.0)}, UNIFORM)
    assert similar and table.all().all()


def test_lens_comparison_differs_when_a_finding_flips_or_the_spread_doubles():
    _, similar = lens_comparison({"plain": stats(0.05, 30.0), "tuned lens": stats(0.20, 30.0)}, UNIFORM)
    assert not similar  # 0.20 is no longer below half the uniform spread
    _, similar = lens_comparison({"plain": stats(0.05, 30.0), "tuned lens": stats(0.05, 0.8)}, UNIFORM)
    assert not similar  # the per-token finding flips
    table, similar = lens_comparison({"plain": stats(0.02, 30.0), "tuned lens": stats(0.05, 30.0)}, UNIFORM)
    assert table.all().all() and not similar  # both hold, but one spreads 2.5x as far


def test_lens_verdict_needs_a_copy_that_reconstructs():
    table, similar = lens_comparison({"plain": stats(0.05, 30.0), "tuned lens": stats(0.20, 30.0)}, UNIFORM)
    verdict = lens_verdict(table, similar, raw_fvu=0.2)
    assert verdict.startswith("differs: latents are specific to a few layers for one only;")
    assert verdict.endswith("wider than per token for both")
    assert lens_verdict(table, similar, raw_fvu=21991.9).startswith("not tested: the tuned-lens copy does not reconstruct")
    assert lens_verdict(table, similar, raw_fvu=float("nan")).startswith("not tested")


def size_stats(share1: float, share10: float, cos: float) -> dict[str, float]:
    return {"share at several layers (t = 1)": share1, "mean layers / layers (t = 1)": share1 / 2,
            "share at several layers (t = 10)": share10, "mean layers / layers (t = 10)": share10 / 2,
            "layer std / layers": (share1 + share10) / 10, "adjacent-layer similarity": cos}


def test_size_comparison_orders_models_by_size_not_by_name():
    sizes = {"big": 270e6, "small": 135e6}
    table, found = size_comparison({"big": size_stats(0.9, 0.6, 0.9), "small": size_stats(0.8, 0.5, 0.8)}, sizes)
    assert list(table.columns[:2]) == ["small", "big"] and found["larger"] == "big"
    assert found["spread"] == {"higher": 5, "lower": 0, "same": 0} and found["similarity"] == 1
    assert found["explanation"] == found["spread"]
    verdict = size_verdict(found)
    assert verdict.startswith("the larger model has latents spread over more layers by every measure, and more similar")
    assert "is consistent with the paper's explanation" in verdict


def test_size_comparison_separates_the_trend_from_the_explanation():
    sizes = {"a": 1.0, "b": 2.0}
    # the larger model spreads its latents less and has less similar layers: against the size trend,
    # but the more similar model (the smaller) spreads them more, as the explanation says
    _, found = size_comparison({"a": size_stats(0.9, 0.6, 0.9), "b": size_stats(0.8, 0.5, 0.8)}, sizes)
    assert found["spread"]["lower"] == 5 and found["similarity"] == -1 and found["explanation"]["higher"] == 5
    assert "fewer layers by every measure" in size_verdict(found) and "is consistent with" in size_verdict(found)
    # mixed: higher at one threshold, lower at the other
    table, found = size_comparison({"a": size_stats(0.8, 0.6, 0.8), "b": size_stats(0.9, 0.5, 0.9)}, sizes)
    assert found["spread"]["higher"] and found["spread"]["lower"] and "partly consistent" in size_verdict(found)
    assert not any(ch.isdigit() for ch in size_verdict(found))  # every number beside it comes from the recorder
    # values equal to the decimals shown are the same, not higher or lower
    table, found = size_comparison({"a": size_stats(1.0, 0.6, 0.8), "b": size_stats(0.99996, 0.7, 0.9)}, sizes)
    assert table.loc["share at several layers (t = 1)", "in the larger model"] == "the same"
    assert "by every measure that differs" in size_verdict(found)
    with pytest.raises(ValueError):
        size_comparison({"a": size_stats(0.8, 0.6, 0.8)}, {"a": 1.0})
