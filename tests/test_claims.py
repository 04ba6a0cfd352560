"""The book's verdict rules (book.claims), on values where the answer is known."""

from book.claims import lens_comparison

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
