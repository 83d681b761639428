"""The logic around vLLM's prefix cache and the logits budget (engines.py), without an engine: the
vLLM path itself is tested against a plain forward in test_parity.py."""

from services.refscore.engines import EngineSettings, _fill_from_sibling


def test_cache_served_answer_positions_are_taken_from_the_sibling_with_the_same_tokens():
    # The cache reached 2 positions into the answer: the sibling starts with the same 2 tokens.
    lps = [None, None, -3.0, -4.0]
    assert _fill_from_sibling(lps, [5, 6, 7, 8], [5, 6, 9], [-1.0, -2.0, -9.0]) == [-1.0, -2.0, -3.0, -4.0]


def test_a_sibling_that_differs_where_the_cache_served_gives_none_so_the_answer_is_recomputed():
    assert _fill_from_sibling([None, None, -3.0], [5, 6, 7], [5, 4, 7], [-1.0, -2.0, -3.0]) is None
    assert _fill_from_sibling([None, None, -3.0], [5, 6, 7], [5], [-1.0]) is None  # sibling too short
    assert _fill_from_sibling([None], [5], [5], None) is None  # the sibling itself was not scored


def test_nothing_served_from_the_cache_is_returned_as_is():
    assert _fill_from_sibling([-1.0, -2.0], [1, 2], [3], [-5.0]) == [-1.0, -2.0]


def test_the_logits_budget_bounds_positions_per_pass_by_bytes_not_positions():
    settings = EngineSettings(logits_budget_mb=512)
    # logits, their log-softmax and one temporary, float32: 12 bytes per (position, row).
    assert settings.logits_rows(151_936) == 512 * 2**20 // (151_936 * 12) == 294
    assert settings.logits_rows(4096) == 10_922
    assert EngineSettings(logits_budget_mb=1).logits_rows(10**9) == 1  # never zero
