import pytest
import torch

from bigmodel.data import BucketBatchSampler, TextDataset, pad_batch


def _lengths(n=1000, seed=0):
    return torch.randint(1, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_pad_batch():
    ids, lengths, labels = pad_batch([(torch.tensor([5, 6, 7]), 1), (torch.tensor([8]), 0)])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert lengths.tolist() == [3, 1]
    assert labels.tolist() == [1, 0]
    assert ids.dtype == lengths.dtype == labels.dtype == torch.int64


def test_dataset():
    ds = TextDataset([torch.tensor([1, 2]), torch.tensor([3])], [1, 0])
    assert len(ds) == 2 and ds.lengths == [2, 1]
    assert ds[1][1] == 0
    with pytest.raises(ValueError):
        TextDataset([torch.tensor([1])], [0, 1])


def test_every_index_once_per_epoch_and_len_matches():
    lengths = _lengths()
    sampler = BucketBatchSampler(lengths, 32, seed=3, pool_batches=5)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 32 for b in batches)


def test_batches_are_sorted_and_pad_less_than_random_batches():
    lengths = _lengths()
    sampler = BucketBatchSampler(lengths, 32, seed=0, pool_batches=10)
    batches = list(sampler)
    for b in batches:
        assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    random_batches = [perm[i : i + 32] for i in range(0, len(perm), 32)]
    assert padding(batches) < padding(random_batches) / 5


def test_seeded_per_epoch():
    lengths = _lengths()
    a, b = BucketBatchSampler(lengths, 16, seed=1), BucketBatchSampler(lengths, 16, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(BucketBatchSampler(lengths, 16, seed=2)) != first


def test_batch_order_is_shuffled():
    lengths = _lengths()
    firsts = [lengths[b[0]] for b in BucketBatchSampler(lengths, 16, seed=0, pool_batches=1000)]
    assert firsts != sorted(firsts)


def test_unshuffled_is_sorted_by_length():
    lengths = _lengths(100)
    batches = list(BucketBatchSampler(lengths, 10, shuffle=False))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)
    assert len(batches) == 10


@pytest.mark.parametrize("n", [1, 95, 100, 1000])
@pytest.mark.parametrize("replicas", [2, 3])
def test_distributed_even_split(n, replicas):
    lengths = _lengths(n)
    samplers = [
        BucketBatchSampler(lengths, 10, seed=4, num_replicas=replicas, rank=r) for r in range(replicas)
    ]
    shards = [list(s) for s in samplers]
    assert len({len(s) for s in shards}) == 1
    assert all(len(s) == len(sampler) for s, sampler in zip(shards, samplers, strict=True))
    seen = [i for shard in shards for b in shard for i in b]
    assert set(seen) == set(range(n))
    # the global batches are those of one process, dealt out round-robin
    single = list(BucketBatchSampler(lengths, 10, seed=4))
    assert shards[0][0] == single[0]
    if len(single) > 1:
        assert shards[1][0] == single[1]


@pytest.mark.parametrize("shuffle", [True, False])
def test_distributed_uneven_split_sees_each_index_once(shuffle):
    lengths = _lengths(95)
    samplers = [
        BucketBatchSampler(lengths, 10, shuffle=shuffle, num_replicas=3, rank=r, even=False) for r in range(3)
    ]
    seen = sorted(i for s in samplers for b in s for i in b)
    assert seen == list(range(95))
    assert [len(list(s)) for s in samplers] == [len(s) for s in samplers]


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        BucketBatchSampler([1], 0)
    with pytest.raises(ValueError):
        BucketBatchSampler([1], 1, num_replicas=2, rank=2)
    with pytest.raises(ValueError):
        BucketBatchSampler([1], 1, pool_batches=0)
