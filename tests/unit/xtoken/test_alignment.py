"""Alignment from offset tensors (torch only): the rules, batching, and a random-cut reference."""

import itertools
import random

import pytest
import torch

from kdistill.xtoken.alignment import (
    TokenAlignment,
    align_offsets,
    match_prefix_ends,
    prefix_ends,
)


def spans(*pairs):
    return torch.tensor([list(pairs)], dtype=torch.int64)


def pairs_of(alignment, row=0):
    keep = alignment.mask[row]
    return list(
        zip(
            alignment.teacher_positions[row][keep].tolist(),
            alignment.student_positions[row][keep].tolist(),
            strict=True,
        )
    )


@pytest.mark.parametrize(
    ("offsets", "expected"),
    [
        # BOS anchors the empty prefix; EOS (after text) ends nothing
        (spans((0, 0), (0, 3), (3, 7), (0, 0)), [0, 3, 7, -1]),
        # three byte pieces of one character: only the last ends the prefix
        (spans((0, 2), (2, 3), (2, 3), (2, 3)), [2, -1, -1, 3]),
        # a byte piece that also covers the next character ends inside a character
        (spans((0, 1), (1, 2), (1, 3)), [1, -1, 3]),
        # SentencePiece's prepended "▁" shares the first character's span
        (spans((0, 1), (0, 1), (1, 4)), [-1, 1, 4]),
        # whitespace emptied by trim_offsets ends nothing; leading spaces move only `start`
        (spans((0, 5), (6, 6), (7, 12)), [5, -1, 12]),
        # two leading specials: only the last anchors the empty prefix
        (spans((0, 0), (0, 0), (0, 2)), [-1, 0, 2]),
        # no text at all: the last special token is the anchor
        (spans((0, 0), (0, 0)), [-1, 0]),
    ],
    ids=[
        "bos-eos",
        "byte-pieces",
        "piece-overlap",
        "prepended-space",
        "trimmed",
        "two-bos",
        "no-text",
    ],
)
def test_prefix_ends_rules(offsets, expected):
    assert prefix_ends(offsets).tolist() == [expected]


def test_prefix_ends_ignores_padding_on_either_side():
    # left padding, BOS, two tokens; right padding after
    offsets = spans((0, 0), (0, 0), (0, 0), (0, 2), (2, 4), (0, 0))
    mask = torch.tensor([[False, False, True, True, True, False]])
    assert prefix_ends(offsets, mask).tolist() == [[-1, -1, 0, 2, 4, -1]]


def test_word_split_one_three_against_two_two():
    # "abcd efgh": teacher "a" "bcd" " efgh", student "ab" "cd" " ef" "gh"
    teacher = spans((0, 1), (1, 4), (4, 9))
    student = spans((0, 2), (2, 4), (4, 7), (7, 9))
    assert pairs_of(align_offsets(teacher, student)) == [(1, 1), (2, 3)]


def test_bos_pairs_only_with_bos():
    teacher = spans((0, 0), (0, 2), (2, 4))
    with_bos = spans((0, 0), (0, 4))
    without_bos = spans((0, 4), (0, 0))  # text then EOS
    assert pairs_of(align_offsets(teacher, with_bos)) == [(0, 0), (2, 1)]
    assert pairs_of(align_offsets(teacher, without_bos)) == [(2, 0)]


def test_batch_pads_pairs_and_keeps_rows_independent():
    teacher = torch.tensor([[[0, 1], [1, 2], [2, 3]], [[0, 3], [0, 0], [0, 0]]])
    student = torch.tensor([[[0, 3], [0, 0]], [[0, 1], [1, 3]]])
    teacher_mask = torch.tensor([[True, True, True], [True, False, False]])
    student_mask = torch.tensor([[True, False], [True, True]])
    alignment = align_offsets(teacher, student, teacher_mask, student_mask)
    assert alignment.teacher_positions.shape == (2, 1)
    assert pairs_of(alignment, 0) == [(2, 0)]
    assert pairs_of(alignment, 1) == [(0, 1)]
    for row in range(2):
        single = align_offsets(
            teacher[row : row + 1],
            student[row : row + 1],
            teacher_mask[row : row + 1],
            student_mask[row : row + 1],
        )
        assert pairs_of(single) == pairs_of(alignment, row)


def test_no_pairs_gives_empty_alignment():
    alignment = align_offsets(spans((0, 1), (1, 3)), spans((0, 2), (2, 4)))
    assert alignment.teacher_positions.shape == (1, 0)
    assert alignment.num_pairs.tolist() == [0]


def _random_tokenization(rng, cuts, length, bos):
    """Spans of tokens between the cut points, some split into 'byte pieces' of one char."""
    offsets, ends = [], []
    if bos:
        offsets.append((0, 0))
        ends.append(0)
    bounds = [0, *sorted(cuts), length]
    for start, end in itertools.pairwise(bounds):
        if end - start == 1 and rng.random() < 0.3:
            pieces = rng.randint(2, 4)
            offsets += [(start, end)] * pieces
            ends += [None] * (pieces - 1) + [end]
        else:
            offsets.append((start, end))
            ends.append(end)
    if rng.random() < 0.5:
        offsets.append((0, 0))  # EOS
        ends.append(None)
    return offsets, ends


def test_random_tokenizations_match_a_reference():
    # independent reference: two tokenizations of one string given by cut points; the pairs
    # are the positions that end a common cut (the last piece of a split character), plus the
    # two BOS tokens when both sides have one
    rng = random.Random(0)
    for _ in range(20):
        batch = []
        for _ in range(rng.randint(1, 4)):
            length = rng.randint(1, 30)
            t_cuts = set(rng.sample(range(1, length), rng.randint(0, length - 1)))
            s_cuts = set(rng.sample(range(1, length), rng.randint(0, length - 1)))
            t, t_ends = _random_tokenization(rng, t_cuts, length, rng.random() < 0.5)
            s, s_ends = _random_tokenization(rng, s_cuts, length, rng.random() < 0.5)
            expected = [
                (i, s_ends.index(e)) for i, e in enumerate(t_ends) if e is not None and e in s_ends
            ]
            batch.append((t, s, expected))
        width_t = max(len(t) for t, _, _ in batch)
        width_s = max(len(s) for _, s, _ in batch)
        teacher = torch.zeros(len(batch), width_t, 2, dtype=torch.int64)
        student = torch.zeros(len(batch), width_s, 2, dtype=torch.int64)
        t_mask = torch.zeros(len(batch), width_t, dtype=torch.bool)
        s_mask = torch.zeros(len(batch), width_s, dtype=torch.bool)
        for row, (t, s, _) in enumerate(batch):
            teacher[row, : len(t)] = torch.tensor(t)
            student[row, : len(s)] = torch.tensor(s)
            t_mask[row, : len(t)] = True
            s_mask[row, : len(s)] = True
        alignment = align_offsets(teacher, student, t_mask, s_mask)
        for row, (_, _, expected) in enumerate(batch):
            assert pairs_of(alignment, row) == expected


def test_gather_and_to():
    alignment = match_prefix_ends(torch.tensor([[0, -1, 3]]), torch.tensor([[-1, 0, 3]]))
    assert pairs_of(alignment) == [(0, 1), (2, 2)]
    values = torch.arange(6.0).view(1, 3, 2)
    assert alignment.gather_teacher(values).tolist() == [[[0.0, 1.0], [4.0, 5.0]]]
    assert alignment.to("cpu").mask.tolist() == [[True, True]]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: align_offsets(torch.zeros(1, 2), spans((0, 1))), ValueError, "teacher_offsets"),
        (
            lambda: align_offsets(spans((0, 1)), torch.zeros(1, 1, 2)),
            TypeError,
            "integer tensor",
        ),
        (
            lambda: align_offsets(spans((0, 1)), spans((0, 1)), torch.ones(1, 2, dtype=torch.bool)),
            ValueError,
            "teacher_mask",
        ),
        (
            lambda: match_prefix_ends(torch.zeros(2, 3, dtype=torch.long), torch.zeros(1, 3)),
            ValueError,
            "batches differ",
        ),
        (
            lambda: TokenAlignment(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2).bool()),
            ValueError,
            "one shape",
        ),
        (
            lambda: TokenAlignment(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2)),
            TypeError,
            "bool",
        ),
    ],
    ids=[
        "offsets-shape",
        "offsets-dtype",
        "mask-shape",
        "batch",
        "alignment-shape",
        "alignment-mask",
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
