from bigmodel.data import tokenize


def test_lower_cases_and_splits_on_non_letters():
    assert tokenize("The MOVIE,was-great; 10/10") == ["the", "movie", "was", "great"]


def test_keeps_exclamation_and_question_marks():
    assert tokenize("Really?! Wow!") == ["really", "?", "!", "wow", "!"]


def test_splits_negation_contractions():
    assert tokenize("It isn't good, don't go") == ["it", "is", "n't", "good", "do", "n't", "go"]
    assert tokenize("can't won't") == ["can", "n't", "will", "n't"]


def test_splits_clitics_and_keeps_other_apostrophes():
    assert tokenize("it's we'll they're o'brien") == ["it", "'s", "we", "'ll", "they", "'re", "o'brien"]
    assert tokenize("\u2019quoted\u2019 isn\u2019t") == ["quoted", "is", "n't"]


def test_drops_html_tags():
    assert tokenize("good.<br /><br />bad") == ["good", "bad"]


def test_non_ascii_letters_are_letters():
    assert tokenize("Café naïve") == ["café", "naïve"]


def test_empty():
    assert tokenize("") == []
    assert tokenize("123 ... --") == []
