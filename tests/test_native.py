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


# --- issue 10: hardening -----------------------------------------------------


def _padded_copy(name: str, tmp_path: Path) -> Path:
    """The shared tokenizer.json re-saved with padding (Fixed 128) and truncation (64) switched on."""
    t = PyTokenizer.from_file(str(tok_path(name)))
    pad_id = t.token_to_id("<|endoftext|>")
    t.enable_padding(length=128, pad_id=pad_id, pad_token="<|endoftext|>")
    t.enable_truncation(64)
    out = tmp_path / name / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    t.save(str(out))
    assert '"padding": {' in out.read_text() or '"padding":{' in out.read_text()
    return out


@needs_shared
@pytest.mark.parametrize("name", TOKENIZERS)
def test_padding_and_truncation_in_the_tokenizer_file_are_ignored(name, tmp_path):
    padded = _padded_copy(name, tmp_path)
    texts = ["hello world", "", None, "word " * 300, "Ünïcödé 🎉 <|endoftext|> done"]
    plain = tok_path(name)
    for add in (False, True):
        want = reference_counts(texts, plain, add_special_tokens=add)
        for tk in (padded, padded.parent, padded.read_text(encoding="utf-8"), Tokenizer(padded), Tokenizer.from_str(padded.read_text())):
            np.testing.assert_array_equal(count_tokens(texts, tk, add_special_tokens=add), want)
        ids, off = Tokenizer(padded).encode(texts, add_special_tokens=add)
        for i, t in enumerate(texts):
            ref = reference(plain).encode(t, add_special_tokens=add).ids if t is not None else []
            assert ids[off[i] : off[i + 1]].tolist() == ref
    assert count_tokens(["hello world"], padded).sum() == 2
    assert Tokenizer(padded).vocab_size == Tokenizer(plain).vocab_size
    ids, off = Tokenizer(padded).encode(["word " * 300], max_length=100)
    assert off.tolist() == [0, 100], "deft's own max_length still truncates"


@needs_shared
def test_distribution_from_a_padded_tokenizer_has_no_pad_counts(tmp_path):
    from deft.distribution import build_distribution, resolve_tokenizer

    padded = _padded_copy("smollm2", tmp_path)
    graded = pl.DataFrame(
        {
            "responses": [["I am glad to help you.", "No."], ["Sure, here it is.", "Go away, I will not."]],
            "polarity": [[1, -1], [1, -1]],
        }
    )
    pad_id = reference(tok_path("smollm2")).token_to_id("<|endoftext|>")
    dist = build_distribution(graded, resolve_tokenizer(padded), template="plain")
    plain = build_distribution(graded, resolve_tokenizer(tok_path("smollm2")), template="plain")
    assert dist.q_pos[pad_id] == 0 and dist.q_neg[pad_id] == 0
    np.testing.assert_array_equal(dist.q_pos, plain.q_pos)
    np.testing.assert_array_equal(dist.q_neg, plain.q_neg)
    assert int(dist.q_pos.sum()) < 30  # unpadded: a few tokens per response, not 128


_SPARSE_CHILD = """
import sys
from tokenizers import Tokenizer, models, pre_tokenizers
from deft._native import Tokenizer as Native, count_tokens
big = int(sys.argv[1])
t = Tokenizer(models.WordLevel({"[UNK]": big, "a": 0}, unk_token="[UNK]"))
t.pre_tokenizer = pre_tokenizers.Whitespace()
js = t.to_str()
ids, off = Native(js).encode(["a b"])
assert ids.tolist() == [0, big], ids   # encoding is fine: only histograms are refused
for call in (lambda: count_tokens(["a b", "a"], js), lambda: Native(js).count_tokens(["a"]), lambda: Native(js).vocab_size):
    try:
        call()
    except ValueError as e:
        print("ValueError:", e)
    else:
        print("no error")
"""


@pytest.mark.parametrize("big", [4_000_000_000, 2**28])
def test_a_huge_token_id_is_a_clear_error_not_an_abort(big, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "child.py"
    script.write_text(_SPARSE_CHILD)
    res = subprocess.run([sys.executable, str(script), str(big)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"child died with {res.returncode}: {res.stderr[-2000:]}"
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 3, res.stdout
    for line in lines:
        assert line.startswith("ValueError:") and "too sparse" in line and str(big) in line and "2 tokens" in line, line


def test_small_holes_in_the_id_space_keep_largest_id_plus_one():
    from tokenizers import models, pre_tokenizers

    t = PyTokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 5000}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tk = Tokenizer(t.to_str())
    assert tk.vocab_size == 5001
    h = tk.count_tokens(["b a c b"])
    assert h.shape == (5001,) and (h[0], h[1], h[5000]) == (1, 1, 2)


@needs_shared
def test_decode_accepts_any_1d_integer_array_or_sequence():
    tk = native(tok_path("gpt2"))
    ids, _ = tk.encode(["Hello there, General Kenobi! " * 3])
    want = reference(tok_path("gpt2")).decode(ids[::2].tolist(), skip_special_tokens=False)
    for x in (
        ids[::2],
        ids.astype(np.int64)[::2],
        ids.astype(np.uint64)[::2],
        ids.astype(np.int32)[::2].copy(),
        ids[::-1][::-1][::2],
        np.ascontiguousarray(ids[::2]).astype(">i8"),
        ids[::2].tolist(),
        tuple(ids[::2].tolist()),
        list(ids[::2]),  # numpy scalars
    ):
        assert tk.decode(x) == want, type(x)
    assert tk.decode(np.array([], dtype=np.int16)) == ""
    assert tk.decode(np.asarray(ids[:4], dtype=np.uint16)) == reference(tok_path("gpt2")).decode(ids[:4].tolist())
    for bad, exc, msg in (
        ([1, -1], ValueError, r"ids\[1\] = -1"),
        (np.array([3, -2], dtype=np.int8), ValueError, r"ids\[1\] = -2"),
        ([2**32], ValueError, r"ids\[0\] = 4294967296"),
        (np.array([2**40], dtype=np.uint64), ValueError, r"ids\[0\] = 1099511627776"),
        ([2**80], ValueError, r"ids\[0\] = 1208925819614629174706176"),
        (np.zeros((2, 2), dtype=np.int32), ValueError, "1-D"),
        (np.array([1.0]), TypeError, "integer array"),
        ("abc", TypeError, "not str"),
        ([1, "a"], TypeError, r"ids\[1\] is str"),
    ):
        with pytest.raises(exc, match=msg):
            tk.decode(bad)


def _levels(*codes):
    return pa.array(list(codes), type=pa.uint8())


def test_assign_polarity_reads_sliced_list_arrays_and_ignores_hidden_nulls():
    full = pa.array([[9.0, None], [1.0, 3.0], [2.0, 5.0, 1.0], [0.0, None, 1.0]], type=pa.list_(pa.float64()))
    for typ in (pa.list_(pa.float64()), pa.large_list(pa.float64())):
        arr = full.cast(typ)
        order, norm, pol = _native.assign_polarity(arr[1:3], _levels(0, 1))
        assert order.to_pylist() == [[1, 0], [1, 0, 2]]
        assert norm.to_pylist() == [[1.0, 0.0], [1.0, 0.25, 0.0]]
        assert pol.to_pylist() == [[1, -1], [1, 0, -1]]
        # sliced chunks inside a chunked array, and a sliced levels array
        chunked = pa.chunked_array([arr[1:2], arr[2:3]])
        assert _native.assign_polarity(chunked, _levels(9, 0, 1)[1:])[0].to_pylist() == [[1, 0], [1, 0, 2]]
        # a null the visible rows do reference is still an error naming row and index
        with pytest.raises(ValueError, match=r"row 1: field 'scores\[1\]': null entry inside a list"):
            _native.assign_polarity(arr[2:4], _levels(0, 0))
    # Polars slices too
    s = pl.Series([[9.0, None], [1.0, 3.0], [2.0, 5.0, 1.0]])
    assert _native.assign_polarity(s.slice(1), _levels(0, 1))[0].to_pylist() == [[1, 0], [1, 0, 2]]


@pytest.mark.parametrize("name", ["a_pos", "a_neg", "b_pos", "b_neg", "c_pos", "c_neg"])
@pytest.mark.parametrize("value", [-1.0, 1.0000001, float("nan"), float("inf"), -float("inf")])
def test_assign_polarity_validates_thresholds_like_grade(name, value):
    arr = pa.array([[1.0, 2.0, 3.0]], type=pa.list_(pa.float64()))
    with pytest.raises(ValueError, match=rf"threshold {name}=.* must be between 0 and 1"):
        _native.assign_polarity(arr, _levels(0), **{name: value})
    for ok in (None, 0.0, 1.0, 0.5):
        _native.assign_polarity(arr, _levels(0), **{name: ok})


def test_assign_polarity_extreme_scores_do_not_overflow_to_nan():
    arr = pa.array([[1e308, -1e308, 0.0], [-1.7976931348623157e308, 1.7976931348623157e308], [5e307, -1e308, 1e308, 1e308]], type=pa.list_(pa.float64()))
    order, norm, pol = _native.assign_polarity(arr, _levels(1, 0, 0))
    assert order.to_pylist() == [[0, 2, 1], [1, 0], [2, 3, 0, 1]]
    norm = norm.to_pylist()
    assert norm[0] == [1.0, 0.5, 0.0] and norm[1] == [1.0, 0.0]
    assert all(0.0 <= r <= 1.0 for row in norm for r in row), norm
    assert pol.to_pylist() == [[1, 0, -1], [1, -1], [1, 1, 0, -1]]
