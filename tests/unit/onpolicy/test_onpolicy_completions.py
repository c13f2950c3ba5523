"""``Completions``: packing, EOS cut, masks, labels and positions, checked by hand."""

import pytest
import torch

from kdistill.onpolicy import Completions, pack_tokens


def test_pack_tokens_moves_padding_and_keeps_order():
    ids = torch.tensor([[5, 0, 6, 0], [0, 0, 7, 8], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]]).bool()
    left_ids, left_mask = pack_tokens(ids, mask, "left", pad_token_id=9)
    assert left_ids.tolist() == [[9, 9, 5, 6], [9, 9, 7, 8], [1, 2, 3, 4]]
    assert left_mask.tolist() == [
        [False, False, True, True],
        [False, False, True, True],
        [True] * 4,
    ]
    right_ids, right_mask = pack_tokens(ids, mask, "right", pad_token_id=9)
    assert right_ids.tolist() == [[5, 6, 9, 9], [7, 8, 9, 9], [1, 2, 3, 4]]
    assert right_mask.sum(1).tolist() == [2, 2, 4]
    with pytest.raises(ValueError, match="'left' or 'right'"):
        pack_tokens(ids, mask, "middle", 0)


def test_from_parts_layout_masks_and_labels():
    prompts = torch.tensor([[3, 4, 0], [5, 0, 0]])  # right-padded on purpose
    prompt_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    completions = torch.tensor([[0, 7, 8], [9, 0, 0]])  # left-padded on purpose
    completion_mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    batch = Completions.from_parts(
        prompts, prompt_mask, completions, completion_mask, pad_token_id=0
    )
    assert batch.prompt_length == 3
    assert batch.input_ids.tolist() == [[0, 3, 4, 7, 8], [0, 0, 5, 9, 0]]
    assert batch.attention_mask.tolist() == [[0, 1, 1, 1, 1], [0, 0, 1, 1, 0]]
    assert batch.completion_mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]]
    # position t predicts token t + 1
    assert batch.target_mask.tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]]
    assert batch.labels().tolist() == [[-100, -100, -100, 7, 8], [-100, -100, -100, 9, -100]]
    # positions count real tokens only: left padding does not shift the prompt
    assert batch.position_ids.tolist() == [[0, 0, 1, 2, 3], [0, 0, 0, 1, 1]]
    assert batch.completion_ids.tolist() == [[7, 8], [9, 0]]
    assert batch.lengths.tolist() == [2, 1] and batch.num_tokens == 3
    assert batch.ended.tolist() == [False, False]  # no EOS id given


def test_cut_at_eos_keeps_the_eos_and_drops_what_follows():
    prompts = torch.tensor([[1], [1], [1]])
    completions = torch.tensor([[5, 2, 6, 2], [5, 6, 7, 8], [2, 5, 5, 5]])
    batch = Completions.from_parts(
        prompts, None, completions, None, pad_token_id=0, eos_token_id=[2, 9], cut_at_eos=True
    )
    assert batch.completion_ids.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert batch.lengths.tolist() == [2, 4, 1]
    assert batch.ended.tolist() == [True, False, True]
    kept = Completions.from_parts(prompts, None, completions, None, eos_token_id=2)
    assert kept.lengths.tolist() == [4, 4, 4] and kept.ended.tolist() == [True, False, False]


def test_completion_part_is_trimmed_to_the_longest_row():
    batch = Completions.from_parts(
        torch.tensor([[1, 2]]), None, torch.tensor([[4, 0, 0, 0]]), torch.tensor([[1, 0, 0, 0]])
    )
    assert batch.input_ids.tolist() == [[1, 2, 4]]


@pytest.mark.parametrize(
    ("prompt", "completion", "error", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 2).long(), ValueError, "integer tensor"),
        (torch.zeros(2, 3).long(), torch.zeros(3, 2).long(), ValueError, "batch size"),
        ([[1, 2]], torch.zeros(1, 2).long(), TypeError, "must be a tensor"),
    ],
    ids=["float-ids", "batch-mismatch", "not-a-tensor"],
)
def test_from_parts_rejects_bad_inputs(prompt, completion, error, match):
    with pytest.raises(error, match=match):
        Completions.from_parts(prompt, None, completion, None)


def test_mask_shape_is_checked():
    with pytest.raises(ValueError, match="same shape"):
        Completions.from_parts(
            torch.ones(2, 3).long(), torch.ones(2, 2), torch.ones(2, 2).long(), None
        )
