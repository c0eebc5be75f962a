from services.cache.names import is_safe_stem, safe_stem


def test_safe_names_are_kept_unchanged():
    assert safe_stem("train-000123_a") == "train-000123_a"


def test_unsafe_names_become_deterministic_distinct_safe_stems():
    first = safe_stem("synthetic/train-000001.tar")
    assert first == safe_stem("synthetic/train-000001.tar")
    assert is_safe_stem(first) and first.startswith("synthetic_train-000001_tar-")
    assert safe_stem("synthetic/train-000001_tar") != first
