"""Unit tests for train.py's schedule, data order and response selection,
with expected values worked out by hand from the functions' contracts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deft.train import PAIRWISE, epoch_order, lr_lambda, select_responses

# ---------------------------------------------------------------------------
# lr_lambda: warmup (step + 1) / (warmup + 1), then linear / cosine / constant
# over the remaining total - warmup steps


def test_warmup_uses_step_plus_one():
    # total 10, warmup 4: steps 0..3 -> 1/5, 2/5, 3/5, 4/5 (never 0 at step 0)
    for kind in ("linear", "cosine", "constant"):
        f = lr_lambda(10, 4, kind)
        assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8], rel=1e-15, abs=0)
        assert f(0) > 0


def test_linear_after_warmup():
    f = lr_lambda(10, 4, "linear")  # rest = 6 steps: 1 - (step - 4) / 6
    want = {4: 1.0, 5: 5 / 6, 6: 4 / 6, 7: 0.5, 8: 2 / 6, 9: 1 / 6, 10: 0.0, 11: 0.0, 100: 0.0}
    for step, v in want.items():
        assert f(step) == pytest.approx(v, rel=1e-12, abs=0), step


def test_cosine_after_warmup():
    f = lr_lambda(10, 4, "cosine")  # 0.5 * (1 + cos(pi * (step - 4) / 6))
    want = {
        4: 1.0,
        5: 0.5 + math.sqrt(3) / 4,  # cos(pi/6) = sqrt(3)/2
        6: 0.75,                    # cos(pi/3) = 1/2
        7: 0.5,                     # cos(pi/2) = 0
        8: 0.25,                    # cos(2pi/3) = -1/2
        9: 0.5 - math.sqrt(3) / 4,
    }
    for step, v in want.items():
        assert f(step) == pytest.approx(v, rel=1e-12, abs=1e-15), step
    assert abs(f(10)) < 1e-15 and abs(f(50)) < 1e-15  # clamped at progress 1: cos(pi) = -1


def test_constant_after_warmup():
    f = lr_lambda(10, 4, "constant")
    assert [f(s) for s in (4, 5, 9, 10, 1000)] == [1.0] * 5


def test_no_warmup():
    f = lr_lambda(4, 0, "linear")  # 1 - step / 4
    assert [f(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], rel=1e-15, abs=0)
    g = lr_lambda(4, 0, "cosine")
    assert g(0) == 1.0 and g(2) == pytest.approx(0.5, rel=1e-12, abs=0)


def test_warmup_covers_everything():
    # total == warmup: rest = max(1, 0) = 1
    f = lr_lambda(3, 3, "linear")
    assert [f(s) for s in range(3)] == pytest.approx([0.25, 0.5, 0.75], rel=1e-15, abs=0)
    assert f(3) == 1.0 and f(4) == 0.0


# ---------------------------------------------------------------------------
# epoch_order: a seeded permutation of range(n), wrapped to a multiple of group


def test_epoch_order_is_a_permutation():
    o = epoch_order(10, 0, 0, 1)
    assert o.shape == (10,)
    assert sorted(o.tolist()) == list(range(10))
    o = epoch_order(12, 3, 2, 4)  # 12 is a multiple of 4: no padding
    assert sorted(o.tolist()) == list(range(12))


def test_epoch_order_deterministic_per_seed_and_epoch():
    np.random.seed(1)
    a = epoch_order(50, 7, 3, 1)
    np.random.seed(2)  # the global numpy state plays no part
    b = epoch_order(50, 7, 3, 1)
    assert a.tolist() == b.tolist()
    assert a.tolist() != list(range(50))  # shuffled


def test_epoch_order_differs_across_epochs_and_seeds():
    by_epoch = [tuple(epoch_order(50, 7, e, 1).tolist()) for e in range(4)]
    assert len(set(by_epoch)) == 4
    by_seed = [tuple(epoch_order(50, s, 0, 1).tolist()) for s in range(4)]
    assert len(set(by_seed)) == 4
    # (seed, epoch) is not collapsed into one number: (1, 2) and (2, 1) differ
    assert epoch_order(50, 1, 2, 1).tolist() != epoch_order(50, 2, 1, 1).tolist()


def test_epoch_order_wraps_to_a_multiple_of_group():
    base = epoch_order(10, 5, 1, 1).tolist()
    o = epoch_order(10, 5, 1, 4).tolist()  # 10 -> 12: the first two again
    assert len(o) == 12
    assert o[:10] == base and o[10:] == base[:2]
    p = epoch_order(3, 5, 1, 8).tolist()  # 3 -> 8: wrapped cyclically
    q = epoch_order(3, 5, 1, 1).tolist()
    assert sorted(q) == [0, 1, 2]
    assert p == q + q + q[:2]


# ---------------------------------------------------------------------------
# select_responses: responses come best-first (graded order)

RESP = ["best", "second", "third", "fourth", "worst"]
SC = [5.5, 4.0, 3.0, 2.0, -1.0]


def test_pairwise_is_best_and_worst():
    assert PAIRWISE == ("dpo", "ipo")
    for m in PAIRWISE:
        assert select_responses(RESP, SC, m) == (["best", "worst"], [5.5, -1.0])
        assert select_responses(RESP, SC, m, max_responses=3) == (["best", "worst"], [5.5, -1.0])
        assert select_responses(RESP[:2], SC[:2], m) == (["best", "second"], [5.5, 4.0])


def test_sft_is_the_best():
    assert select_responses(RESP, SC, "sft") == (["best"], [5.5])
    assert select_responses(RESP, SC, "sft", max_responses=2) == (["best"], [5.5])


@pytest.mark.parametrize("method", ["pro", "rrhf"])
def test_listwise_keeps_all_or_best_first_and_worst(method):
    assert select_responses(RESP, SC, method) == (RESP, SC)
    assert select_responses(RESP, SC, method, max_responses=5) == (RESP, SC)
    assert select_responses(RESP, SC, method, max_responses=9) == (RESP, SC)
    # at most 4: the 3 best, then the worst
    assert select_responses(RESP, SC, method, max_responses=4) == (["best", "second", "third", "worst"], [5.5, 4.0, 3.0, -1.0])
    assert select_responses(RESP, SC, method, max_responses=3) == (["best", "second", "worst"], [5.5, 4.0, -1.0])
    assert select_responses(RESP, SC, method, max_responses=2) == (["best", "worst"], [5.5, -1.0])
    # fewer than 2 would keep only the worst response: refused, like the config does
    for bad in (1, 0, -3):
        with pytest.raises(ValueError, match="max_responses must be at least 2"):
            select_responses(RESP, SC, method, max_responses=bad)


def test_without_scores_rewards_are_rank_based():
    # no scores: reward n - i for the i-th response (best-first)
    assert select_responses(RESP, None, "pro") == (RESP, [5.0, 4.0, 3.0, 2.0, 1.0])
    assert select_responses(RESP, None, "dpo") == (["best", "worst"], [5.0, 1.0])
    assert select_responses(RESP, None, "rrhf", max_responses=3) == (["best", "second", "worst"], [5.0, 4.0, 1.0])
    assert select_responses(RESP, None, "sft") == (["best"], [5.0])


def test_select_does_not_mutate_inputs():
    r, s = list(RESP), list(SC)
    select_responses(r, s, "pro", max_responses=2)
    assert r == RESP and s == SC


def test_encode_examples_keeps_every_token_of_a_huge_response_made_of_long_tokens():
    """A response is cut to the characters its kept tokens can span before it is
    tokenised; that bound comes from the tokenizer's longest token (GPT-2 has
    tokens of dozens of '=' signs), so the kept tokens are those of the full text."""
    from conftest import shared_file
    from deft._native import Tokenizer
    from deft.train import encode_examples

    tok = Tokenizer.from_file(str(shared_file("tokenizers/gpt2/tokenizer.json")))
    response = "=" * 60_000
    (ex,) = encode_examples(["r"], ["Human: hi\n\nAssistant:"], [[response]], [[1.0]], tok, eos_token_id=50256,
                            response_prefix=" ", max_length=200, max_prompt_length=40)
    full, off = tok.encode([" " + response])
    prompt, _ = tok.encode(["Human: hi\n\nAssistant:"])
    budget = 200 - len(prompt)
    assert len(full) > budget  # the cut is real
    assert ex.input_ids[0].tolist() == prompt.tolist() + full[:budget].tolist()


def test_collate_pads_right_masks_the_prompt_and_keeps_the_slot_layout():
    import torch

    from deft.train import IGNORE_INDEX, Example, collate

    a = Example("a", [np.array([5, 6, 7, 8]), np.array([5, 6, 9])], prompt_len=2, rewards=[2.0, 1.0])
    b = Example("b", [np.array([4, 3]), np.array([4, 1, 2, 3, 0]), np.array([4, 7])], prompt_len=1, rewards=[3.0, 0.5, -1.0])
    out = collate([a, b], pad_id=99)
    P = IGNORE_INDEX
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 99], [5, 6, 9, 99, 99], [4, 3, 99, 99, 99], [4, 1, 2, 3, 0], [4, 7, 99, 99, 99]]
    assert out["labels"].tolist() == [[P, P, 7, 8, P], [P, P, 9, P, P], [P, 3, P, P, P], [P, 1, 2, 3, 0], [P, 7, P, P, P]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert out["row"].tolist() == [0, 0, 1, 1, 1] and out["col"].tolist() == [0, 1, 0, 1, 2]
    assert out["valid"].tolist() == [[True, True, False], [True, True, True]]
    assert out["rewards"].tolist() == [[2.0, 1.0, 0.0], [3.0, 0.5, -1.0]]
    assert out["tokens"] == 16
    assert {k: out[k].dtype for k in ("input_ids", "labels", "attention_mask", "row", "col", "valid", "rewards")} == {
        "input_ids": torch.long, "labels": torch.long, "attention_mask": torch.long, "row": torch.long, "col": torch.long,
        "valid": torch.bool, "rewards": torch.float32}
    assert collate([a], pad_id=0, slots=4)["valid"].tolist() == [[True, True, False, False]]
