import pytest
import torch

from sage_fast.synthesis.pool import SyntheticPool


def batch(start, n, L=5, d=3, C=2, hidden=False):
    ids = torch.arange(start, start + n, dtype=torch.float32)
    vectors = ids.view(n, 1, 1).expand(n, L, d).clone()
    masks = torch.ones(n, L, dtype=torch.long)
    logits = ids.view(n, 1).expand(n, C).clone()
    h = {2: ids.view(n, 1, 1).expand(n, L, 4).clone()} if hidden else None
    return vectors, masks, logits, h


def tags(pool):
    return sorted(pool.logits[: len(pool), 0].tolist())


def test_fifo_keeps_the_newest_and_never_exceeds_capacity():
    pool = SyntheticPool(8, "fifo")
    for r in range(5):
        pool.add(*batch(r * 3, 3))
        assert len(pool) == min(8, 3 * (r + 1))
    assert tags(pool) == list(range(7, 15))


def test_reservoir_is_bounded_and_deterministic():
    def fill(seed):
        pool = SyntheticPool(6, "reservoir")
        g = torch.Generator().manual_seed(seed)
        for r in range(10):
            pool.add(*batch(r * 4, 4), generator=g)
        return pool

    a, b = fill(0), fill(0)
    assert len(a) == 6 and a.offered == 40
    assert tags(a) == tags(b)
    assert len(set(tags(a))) == 6 and max(tags(a)) < 40


def test_rows_stay_together_with_hidden_states():
    pool = SyntheticPool(4, "fifo")
    pool.add(*batch(0, 3, hidden=True), labels=torch.tensor([0, -1, 2]))
    pool.add(*batch(3, 3, hidden=True))  # rows without labels
    vectors, masks, logits, hidden, labels = pool.sample(4, torch.Generator().manual_seed(1))
    assert vectors.shape == (4, 5, 3) and masks.shape == (4, 5) and hidden[2].shape == (4, 5, 4)
    tag = logits[:, 0]
    assert torch.equal(vectors[:, 0, 0], tag) and torch.equal(hidden[2][:, 0, 0], tag)
    assert labels.tolist() == [{0.0: 0, 2.0: 2}.get(t, -1) for t in tag.tolist()]
    assert pool.sample(100)[0].shape[0] == 4
    assert SyntheticPool(3).sample(2) is None


def test_state_dict_round_trip():
    pool = SyntheticPool(5, "reservoir")
    g = torch.Generator().manual_seed(0)
    pool.add(*batch(0, 4, hidden=True), generator=g, labels=torch.tensor([1, 0, -1, 1]))
    pool.add(*batch(4, 4, hidden=True), generator=g)
    copy = SyntheticPool(5, "reservoir")
    copy.load_state_dict(pool.state_dict())
    assert len(copy) == 5 and copy.offered == 8
    assert torch.equal(copy.vectors, pool.vectors) and torch.equal(copy.hidden[2], pool.hidden[2])
    assert torch.equal(copy.labels, pool.labels)
    older = {k: v for k, v in pool.state_dict().items() if k != "labels"}  # saved before rows had labels
    again = SyntheticPool(5, "reservoir")
    again.load_state_dict(older)
    assert bool((again.labels == -1).all()) and torch.equal(again.logits, pool.logits)
    empty = SyntheticPool(5, "reservoir")
    empty.load_state_dict(SyntheticPool(5, "reservoir").state_dict())
    assert len(empty) == 0


def test_bad_input():
    with pytest.raises(ValueError, match="capacity"):
        SyntheticPool(0)
    with pytest.raises(ValueError, match="policy"):
        SyntheticPool(3, "lifo")
    pool = SyntheticPool(3)
    v, m, l, _ = batch(0, 2)
    with pytest.raises(ValueError, match="masks"):
        pool.add(v, m[:, :3], l)
    pool.add(v, m, l)
    with pytest.raises(ValueError, match="pool holds width"):
        pool.add(*batch(0, 2, d=4)[:3])
    with pytest.raises(ValueError, match="capacity"):
        SyntheticPool(True)
    with pytest.raises(ValueError, match="n must be"):
        pool.sample(-1)
    with pytest.raises(ValueError, match=r"labels must be \[M\] = \[2\] integers"):
        pool.add(v, m, l, labels=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="labels must be"):
        pool.add(v, m, l, labels=torch.tensor([0.0, 1.0]))


def test_rows_of_other_lengths_are_padded_and_widen_the_pool():
    pool = SyntheticPool(4, "fifo")
    pool.add(*batch(0, 2, L=5, hidden=True))
    short = batch(2, 1, L=3, hidden=True)
    pool.add(*short[:3], short[3])
    assert pool.vectors.shape == (4, 5, 3) and len(pool) == 3
    assert torch.equal(pool.masks[2], torch.tensor([1, 1, 1, 0, 0]))
    assert torch.equal(pool.vectors[2, 3:], torch.zeros(2, 3)) and torch.equal(pool.hidden[2][2, 3:], torch.zeros(2, 4))
    wide = batch(3, 1, L=7, hidden=True)
    pool.add(*wide[:3], wide[3])
    assert pool.vectors.shape == (4, 7, 3) and pool.masks.shape == (4, 7) and pool.hidden[2].shape == (4, 7, 4)
    assert torch.equal(pool.masks[:4].sum(1), torch.tensor([5, 5, 3, 7]))
    assert torch.equal(pool.vectors[0, :5, 0], torch.zeros(5)) and torch.equal(pool.vectors[1, 5:], torch.zeros(2, 3))
    assert torch.equal(pool.vectors[3, :, 0], torch.full((7,), 3.0))


def token_batch(start, n, L):
    vectors, masks, logits, _ = batch(start, n, L=L)
    masks[:, L - 1] = 0  # each row's last position is padding
    tokens = (torch.arange(start, start + n).view(n, 1) * 100 + torch.arange(L)) * masks
    return vectors, masks, logits, tokens


def test_token_ids_stay_with_their_rows_through_widening_sampling_and_a_resume():
    pool = SyntheticPool(6, "reservoir")
    g = torch.Generator().manual_seed(0)
    for start, L in ((0, 4), (3, 7), (6, 5)):  # narrower and wider rounds than the pool
        vectors, masks, logits, tokens = token_batch(start, 3, L)
        pool.add(vectors, masks, logits, generator=g, tokens=tokens)
    assert pool.tokens.shape == (6, 7)
    copy = SyntheticPool(6, "reservoir")
    copy.load_state_dict(pool.state_dict())
    for p in (pool, copy):
        index = p.draw(6, torch.Generator().manual_seed(1))
        _, masks, logits, _, _ = p.take(index)
        tokens = p.tokens_at(index)
        tag = logits[:, 0].long()
        width = masks.sum(1)
        expected = (tag.view(-1, 1) * 100 + torch.arange(7)) * (torch.arange(7) < width.view(-1, 1))
        assert torch.equal(tokens, expected)  # each row's own ids, padded with 0 where masked
    plain = SyntheticPool(4)
    plain.add(*batch(0, 2))
    assert plain.tokens is None and plain.tokens_at(torch.tensor([0])) is None


def test_a_pool_holds_token_ids_for_every_row_or_for_none():
    vectors, masks, logits, tokens = token_batch(0, 2, 4)
    with_tokens, without = SyntheticPool(4), SyntheticPool(4)
    with_tokens.add(vectors, masks, logits, tokens=tokens)
    without.add(vectors, masks, logits)
    with pytest.raises(ValueError, match="these rows have none, the pool's have them"):
        with_tokens.add(vectors, masks, logits)
    with pytest.raises(ValueError, match="these rows have them, the pool's have none"):
        without.add(vectors, masks, logits, tokens=tokens)
    with pytest.raises(ValueError, match=r"tokens must be int64 token ids \[M, L\] = \[2, 4\]"):
        SyntheticPool(4).add(vectors, masks, logits, tokens=tokens.float())
    with pytest.raises(ValueError, match="tokens must be int64 token ids"):
        SyntheticPool(4).add(vectors, masks, logits, tokens=tokens[:, :3])
