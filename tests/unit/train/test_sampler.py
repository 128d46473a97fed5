import pytest
import torch

from app.data.sampler import DataCursor, ResumableSampler, advance, epoch_indices, samples_per_rank


def take(it, n):
    return [next(it) for _ in range(n)]


def test_ranks_take_disjoint_equal_slices_of_one_epoch():
    n, world = 23, 3
    slices = [epoch_indices(n, 0, seed=5, rank=r, world_size=world).tolist() for r in range(world)]
    assert all(len(s) == n // world for s in slices)
    flat = [i for s in slices for i in s]
    assert len(set(flat)) == len(flat)


def test_each_epoch_is_a_different_permutation_and_reproducible():
    a0 = epoch_indices(50, 0, seed=1, rank=0, world_size=1)
    a1 = epoch_indices(50, 1, seed=1, rank=0, world_size=1)
    assert sorted(a0.tolist()) == sorted(a1.tolist()) == list(range(50))
    assert not torch.equal(a0, a1)
    assert torch.equal(a0, epoch_indices(50, 0, seed=1, rank=0, world_size=1))
    assert not torch.equal(a0, epoch_indices(50, 0, seed=2, rank=0, world_size=1))


def test_stream_resumed_from_a_cursor_continues_exactly():
    n, world, seed = 17, 2, 3
    per_rank = samples_per_rank(n, world)
    full = take(iter(ResumableSampler(n, 1, world, seed)), 40)
    for consumed in (0, 5, per_rank, 21, 39):
        cursor = advance(DataCursor(), consumed, per_rank)
        resumed = take(iter(ResumableSampler(n, 1, world, seed, cursor)), 40 - consumed)
        assert resumed == full[consumed:]


def test_items_carry_their_epoch():
    items = take(iter(ResumableSampler(4, 0, 1, 0)), 9)
    assert [e for e, _ in items] == [0] * 4 + [1] * 4 + [2]


def test_advance_crosses_epochs():
    assert advance(DataCursor(0, 3), 10, 4) == DataCursor(3, 1)
    assert DataCursor.from_dict(DataCursor(2, 1).to_dict()) == DataCursor(2, 1)


def test_bad_cursor_and_tiny_dataset_are_clear_errors():
    with pytest.raises(ValueError, match="cursor position"):
        ResumableSampler(10, 0, 1, 0, DataCursor(0, 10))
    with pytest.raises(ValueError, match="too small"):
        ResumableSampler(1, 0, 2, 0)
