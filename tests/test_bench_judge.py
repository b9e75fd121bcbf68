"""bench/mnist_judge.py: the real digits its class-matched FD floor draws."""

import pytest
import torch

from bench.mnist_judge import same_digits


def test_same_digits_draws_the_generated_sets_count_of_each_digit():
    pool = torch.arange(100) % 10  # 10 real digits of each class
    labels = torch.tensor([3] * 7 + [0] * 2 + [9])
    idx = same_digits(pool, labels)
    assert torch.equal(torch.bincount(pool[idx], minlength=10), torch.bincount(labels, minlength=10))
    assert len(set(idx.tolist())) == len(idx)  # no real digit twice
    assert torch.equal(idx, same_digits(pool, labels))  # a fixed draw
    assert not torch.equal(idx, same_digits(pool, labels, seed=1))


def test_same_digits_says_which_class_has_too_few_real_digits():
    with pytest.raises(ValueError, match="11 generated digits of class 3, but only 10 real ones"):
        same_digits(torch.arange(100) % 10, torch.full((11,), 3))
