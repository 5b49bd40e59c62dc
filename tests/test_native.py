"""deft._native against the Python `tokenizers` library (the reference)."""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as PyTokenizer

from deft import _native
from deft._native import Tokenizer, count_tokens

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZERS = ["gpt2", "smollm2"]
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"shared data folder {SHARED} is absent")


def tok_path(name: str) -> Path:
    return SHARED / "tokenizers" / name / "tokenizer.json"


@functools.lru_cache(maxsize=None)
def reference(path: Path) -> PyTokenizer:
    return PyTokenizer.from_file(str(path))


@functools.lru_cache(maxsize=None)
def native(path: Path) -> Tokenizer:
    return Tokenizer(path)


def reference_counts(texts, path: Path, add_special_tokens: bool = False) -> np.ndarray:
    ref = reference(path)
    hist = np.zeros(ref.get_vocab_size(with_added_tokens=True), dtype=np.uint64)
    for t in texts:
        if t is None:
            continue
        ids = ref.encode(t, add_special_tokens=add_special_tokens).ids
        hist += np.bincount(np.asarray(ids, dtype=np.int64), minlength=hist.size).astype(np.uint64)
    return hist


@pytest.fixture(scope="module")
def hh_responses() -> list[str]:
    path = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            for key in ("chosen", "rejected"):
                out.append(row[key].rsplit("\n\nAssistant:", 1)[1])
    return out


@needs_shared
@pytest.mark.parametrize("name", TOKENIZERS)
def test_counts_equal_reference_on_real_hh_responses(name, hh_responses):
    want = reference_counts(hh_responses, tok_path(name))
    got = count_tokens(hh_responses, tok_path(name))
    assert got.dtype == np.uint64
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert got.sum() > 100_000  # 4,624 real responses


@needs_shared
@pytest.mark.parametrize("name", TOKENIZERS)
def test_encode_equals_reference_on_real_hh_responses(name, hh_responses):
    texts = hh_responses[:500]
    ref = PyTokenizer.from_file(str(tok_path(name)))
    ids, offsets = Tokenizer(tok_path(name)).encode(texts)
    assert ids.dtype == np.uint32 and offsets.dtype == np.int64
    assert len(offsets) == len(texts) + 1
    for i, enc in enumerate(ref.encode_batch(texts, add_special_tokens=False)):
        assert ids[offsets[i] : offsets[i + 1]].tolist() == enc.ids


unicode_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=0, max_size=200
)
tricky = st.sampled_from(
    ["", "\0", "a\0b", "🎉🎉", "e\u0301\u0301", "\u200b", " " * 7, "\n\n\t", "x" * 20_000, "👩‍👩‍👧‍👦 Ünïcödé", "<|im_start|>user"]
)


@needs_shared
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(st.one_of(unicode_text, tricky), min_size=0, max_size=12))
def test_counts_equal_reference_on_generated_unicode(texts):
    for name in TOKENIZERS:
        np.testing.assert_array_equal(count_tokens(texts, native(tok_path(name))), reference_counts(texts, tok_path(name)))


@needs_shared
@settings(max_examples=30, deadline=None)
@given(texts=st.lists(st.one_of(unicode_text, tricky), min_size=0, max_size=8), max_length=st.integers(1, 12))
def test_encode_truncation_matches_slicing_the_reference(texts, max_length):
    ref = reference(tok_path("gpt2"))
    tok = native(tok_path("gpt2"))
    for side in ("left", "right"):
        ids, off = tok.encode(texts, max_length=max_length, truncation_side=side)
        for i, t in enumerate(texts):
            full = ref.encode(t, add_special_tokens=False).ids
            want = full[-max_length:] if side == "left" and len(full) > max_length else full[:max_length]
            assert ids[off[i] : off[i + 1]].tolist() == want


@needs_shared
def test_every_input_container_gives_the_same_counts(hh_responses):
    texts = hh_responses[:300]
    want = count_tokens(texts, tok_path("gpt2"))
    arr = pa.array(texts)

    class CapsuleOnly:  # only the Arrow PyCapsule interface, nothing pyarrow-specific
        def __init__(self, a):
            self._a = a

        def __arrow_c_array__(self, requested_schema=None):
            return self._a.__arrow_c_array__(requested_schema)

    class StreamOnly:
        def __init__(self, a):
            self._a = a

        def __arrow_c_stream__(self, requested_schema=None):
            return self._a.__arrow_c_stream__(requested_schema)

    containers = {
        "tuple": tuple(texts),
        "generator": (t for t in texts),
        "polars": pl.Series(texts),
        "polars-chunked": pl.concat([pl.Series(texts[:100]), pl.Series(texts[100:])], rechunk=False),
        "pyarrow": arr,
        "pyarrow-large": arr.cast(pa.large_string()),
        "pyarrow-view": arr.cast(pa.string_view()),
        "pyarrow-chunked": pa.chunked_array([texts[:7], texts[7:]]),
        "capsule": CapsuleOnly(arr),
        "stream": StreamOnly(pa.chunked_array([texts[:150], texts[150:]])),
    }
    for name, c in containers.items():
        np.testing.assert_array_equal(count_tokens(c, tok_path("gpt2")), want, err_msg=name)


@needs_shared
def test_nulls_are_skipped_and_threads_agree(hh_responses):
    texts = hh_responses[:200]
    with_nulls = [None] + texts[:100] + [None] + texts[100:]
    want = count_tokens(texts, tok_path("gpt2"))
    np.testing.assert_array_equal(count_tokens(with_nulls, tok_path("gpt2")), want)
    np.testing.assert_array_equal(count_tokens(pa.array(with_nulls), tok_path("gpt2")), want)
    for n in (1, 2, 3):
        np.testing.assert_array_equal(count_tokens(texts, tok_path("gpt2"), num_threads=n), want)


@needs_shared
def test_tokenizer_may_be_a_path_a_folder_json_text_or_a_handle():
    texts = ["Hello there", "General Kenobi!"]
    want = reference_counts(texts, tok_path("smollm2"))
    handle = Tokenizer.from_file(tok_path("smollm2"))
    assert handle.vocab_size == 49152
    for tk in (
        str(tok_path("smollm2")),
        tok_path("smollm2"),
        tok_path("smollm2").parent,
        tok_path("smollm2").read_text(encoding="utf-8"),
        handle,
    ):
        np.testing.assert_array_equal(count_tokens(texts, tk), want)
    np.testing.assert_array_equal(handle.count_tokens(texts), want)
    assert Tokenizer(tok_path("gpt2")).vocab_size == 50257
    assert handle.decode(handle.encode(["Hello there"])[0]) == "Hello there"


def test_add_special_tokens_uses_the_post_processor():
    from tokenizers import models, pre_tokenizers, processors

    ref = PyTokenizer(models.WordLevel({"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3, "b": 4}, unk_token="[UNK]"))
    ref.pre_tokenizer = pre_tokenizers.Whitespace()
    ref.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    js = ref.to_str()
    texts = ["a b", "b b c"]
    assert count_tokens(texts, js, add_special_tokens=True).tolist() == [1, 2, 2, 1, 3]
    assert count_tokens(texts, js).tolist() == [1, 0, 0, 1, 3]
    ids, off = Tokenizer(js).encode(texts, add_special_tokens=True, max_length=3)
    assert ids.tolist() == [1, 3, 4, 1, 4, 4] and off.tolist() == [0, 3, 6]


def test_bad_arguments_say_what_is_wrong(tmp_path):
    js = PyTokenizer(__import__("tokenizers").models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")).to_str()
    with pytest.raises(TypeError, match="not a single str"):
        count_tokens("hello", js)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        count_tokens(["a", 3], js)
    with pytest.raises(TypeError, match="Arrow type Int64"):
        count_tokens(pa.array([1, 2]), js)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        count_tokens(["a"], tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        count_tokens(["a"], tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot load tokenizer from .*bad.json"):
        count_tokens(["a"], bad)
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        count_tokens(["a"], js, num_threads=0)
    with pytest.raises(ValueError, match="truncation_side"):
        Tokenizer(js).encode(["a"], truncation_side="middle")
    with pytest.raises(TypeError, match="tokenizer must be"):
        count_tokens(["a"], 42)


def test_module_metadata():
    assert isinstance(_native.__version__, str)
    assert "Tokenizer" in repr(Tokenizer.from_str(PyTokenizer(__import__("tokenizers").models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")).to_str()))
