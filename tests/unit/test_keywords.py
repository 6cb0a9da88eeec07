from stream_app.core.keywords import query_terms


def test_terms_are_lowercased_words_without_stop_words_or_stemming() -> None:
    assert query_terms("The Red Dresses for a WEDDING, red!") == ["red", "dresses", "wedding"]


def test_unicode_words_and_digits_are_kept_underscores_split() -> None:
    assert query_terms("Größe 38 snake_case") == ["größe", "38", "snake", "case"]


def test_contraction_fragments_are_dropped() -> None:
    assert query_terms("I'm sure it's what I'd want") == ["sure", "want"]
