import pytest
import torch

from sage_fast.regions.profile import ErrorProfile, pooled_embedding


def reference_means(num_examples, dim, batches):
    """Plain float64 running means, one example at a time."""
    totals = torch.zeros(num_examples, dtype=torch.float64)
    embedding_totals = torch.zeros(num_examples, dim, dtype=torch.float64)
    counts = torch.zeros(num_examples, dtype=torch.int64)
    for ids, losses, embeddings in batches:
        for i, loss, embedding in zip(ids.tolist(), losses.double(), embeddings.double()):
            totals[i] += loss
            embedding_totals[i] += embedding
            counts[i] += 1
    safe = counts.clamp_min(1).double()
    return totals / safe, embedding_totals / safe.unsqueeze(1), counts


def random_batches(num_examples, dim, sizes, generator):
    batches = []
    for size in sizes:
        # Few distinct ids so that every batch repeats some of them.
        ids = torch.randint(0, num_examples, (size,), generator=generator)
        losses = torch.rand(size, generator=generator) * 5
        embeddings = torch.randn(size, dim, generator=generator)
        batches.append((ids, losses, embeddings))
    return batches


@pytest.mark.parametrize("num_examples,dim", [(1, 3), (7, 5), (50, 16)])
def test_running_mean_matches_reference_with_duplicates(seed, device, num_examples, dim):
    generator = torch.Generator().manual_seed(seed)
    batches = random_batches(num_examples, dim, [1, 9, 33, 64], generator)
    profile = ErrorProfile(num_examples, dim, device)
    for ids, losses, embeddings in batches:
        before = (ids.clone(), losses.clone(), embeddings.clone())
        profile.update(ids, losses.to(device), embeddings.to(device))
        assert torch.equal(ids, before[0]) and torch.equal(losses, before[1]) and torch.equal(embeddings, before[2])
    loss, embedding, count = reference_means(num_examples, dim, batches)
    torch.testing.assert_close(profile.loss.cpu().double(), loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(profile.embedding.cpu().double(), embedding, rtol=1e-5, atol=1e-5)
    assert torch.equal(profile.count.cpu(), count)
    assert torch.equal(profile.seen.cpu(), count > 0)
    assert profile.loss.dtype == torch.float32 and profile.count.dtype == torch.int64


def test_single_batch_of_one_id_repeated(device):
    profile = ErrorProfile(3, 2, device)
    ids = torch.tensor([1, 1, 1, 1])
    losses = torch.tensor([1.0, 2.0, 3.0, 6.0], device=device)
    embeddings = torch.arange(8, dtype=torch.float32, device=device).reshape(4, 2)
    profile.update(ids, losses, embeddings)
    assert profile.loss.tolist() == [0.0, 3.0, 0.0]
    assert profile.embedding[1].tolist() == [3.0, 4.0]
    assert profile.count.tolist() == [0, 4, 0]


def test_refresh_overwrites_visited_ids_and_keeps_the_rest(device):
    profile = ErrorProfile(4, 2, device)
    profile.update(torch.tensor([0, 1, 2]), torch.tensor([10.0, 20.0, 30.0], device=device), torch.full((3, 2), 9.0, device=device))
    profile.update(torch.tensor([0]), torch.tensor([12.0], device=device), torch.full((1, 2), 7.0, device=device))
    batches = [
        (torch.tensor([0, 1]), torch.tensor([1.0, 2.0], device=device), torch.ones(2, 2, device=device)),
        (torch.tensor([0]), torch.tensor([3.0], device=device), torch.full((1, 2), 3.0, device=device)),
    ]
    profile.refresh(batches)
    assert profile.loss.tolist() == [2.0, 2.0, 30.0, 0.0]
    assert profile.embedding[:, 0].tolist() == [2.0, 1.0, 9.0, 0.0]
    assert profile.count.tolist() == [2, 1, 1, 0]
    # After the refresh, updates average again.
    profile.update(torch.tensor([1]), torch.tensor([4.0], device=device), torch.ones(1, 2, device=device))
    assert profile.loss[1].item() == 3.0 and profile.count[1].item() == 2


def test_refreshing_blocks_do_not_nest():
    profile = ErrorProfile(2, 2)
    with profile.refreshing():
        with pytest.raises(RuntimeError):
            with profile.refreshing():
                pass


def test_state_dict_round_trip(device):
    profile = ErrorProfile(5, 3, device)
    profile.update(torch.tensor([4, 2, 4]), torch.tensor([1.0, 2.0, 3.0], device=device), torch.randn(3, 3, device=device))
    restored = ErrorProfile(5, 3, device)
    restored.load_state_dict(profile.state_dict())
    assert torch.equal(restored.loss, profile.loss)
    assert torch.equal(restored.embedding, profile.embedding)
    assert torch.equal(restored.count, profile.count)
    with pytest.raises(ValueError, match="embedding"):
        ErrorProfile(5, 4, device).load_state_dict(profile.state_dict())


def test_pooled_embedding_matches_masked_mean(seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 6, 5, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0]])
    pooled = pooled_embedding(hidden.to(torch.bfloat16), mask)
    assert pooled.dtype == torch.float32 and pooled.shape == (4, 5)
    hidden_bf16 = hidden.to(torch.bfloat16).double()
    expected = torch.stack(
        [hidden_bf16[row][mask[row].bool()].mean(0) if mask[row].any() else torch.zeros(5, dtype=torch.float64)
         for row in range(4)]
    )
    torch.testing.assert_close(pooled.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(pooled[2], torch.zeros(5))
    torch.testing.assert_close(pooled_embedding(hidden), hidden.mean(1))


def test_pooled_embedding_is_differentiable():
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.autograd.gradcheck(lambda h: pooled_embedding(h, mask), (hidden,))


@pytest.mark.parametrize(
    "ids,losses,embeddings,match",
    [
        (torch.tensor([0, 5]), torch.ones(2), torch.ones(2, 3), "ids must lie in"),
        (torch.tensor([-1, 0]), torch.ones(2), torch.ones(2, 3), "ids must lie in"),
        (torch.tensor([0, 1]), torch.ones(3), torch.ones(2, 3), "losses"),
        (torch.tensor([0, 1]), torch.ones(2), torch.ones(3, 3), "embeddings"),
        (torch.tensor([0, 1]), torch.ones(2), torch.ones(2, 4), "embeddings must have 3 columns"),
        (torch.tensor([0, 1]), torch.tensor([1.0, float("nan")]), torch.ones(2, 3), "losses"),
        (torch.tensor([0, 1]), torch.tensor([1.0, float("inf")]), torch.ones(2, 3), "losses"),
        (torch.tensor([0.0, 1.0]), torch.ones(2), torch.ones(2, 3), "ids"),
        (torch.tensor([], dtype=torch.int64), torch.ones(0), torch.ones(0, 3), "empty"),
        (torch.tensor([[0, 1]]), torch.ones(2), torch.ones(2, 3), "ids"),
    ],
)
def test_bad_updates_raise_and_leave_the_profile_unchanged(ids, losses, embeddings, match):
    profile = ErrorProfile(5, 3)
    with pytest.raises(ValueError, match=match):
        profile.update(ids, losses, embeddings)
    assert not profile.seen.any() and not profile.loss.any()


@pytest.mark.parametrize("num_examples,dim", [(0, 3), (3, 0), (2.5, 3), (-1, 2)])
def test_bad_sizes_raise(num_examples, dim):
    with pytest.raises(ValueError):
        ErrorProfile(num_examples, dim)


def test_pooled_embedding_checks_its_mask():
    with pytest.raises(ValueError, match="attention_mask"):
        pooled_embedding(torch.randn(2, 3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="last_hidden_state"):
        pooled_embedding(torch.randn(2, 3), torch.ones(2, 3))


# ------------------------------------------------------------------------------ decaying profile
def _reference_decayed(values: list[float], decay: float) -> float:
    mean = 0.0
    for c, x in enumerate(values, 1):
        mean += max(decay, 1.0 / c) * (x - mean)
    return mean


@pytest.mark.parametrize("decay", [0.05, 0.3, 1.0])
def test_decay_follows_the_reference_and_forgets_old_visits(decay):
    torch.manual_seed(0)
    n, dim, visits = 7, 3, 25
    profile = ErrorProfile(n, dim, decay=decay)
    history = {i: [] for i in range(n)}
    embeddings = {i: [] for i in range(n)}
    for _ in range(visits):
        ids = torch.randperm(n)[:4]
        losses = torch.rand(4) * 5
        emb = torch.randn(4, dim)
        profile.update(ids, losses, emb)
        for j, i in enumerate(ids.tolist()):
            history[i].append(float(losses[j]))
            embeddings[i].append(emb[j].double())
    for i in range(n):
        if not history[i]:
            continue
        expected = _reference_decayed(history[i], decay)
        assert profile.loss[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        ref = torch.zeros(dim, dtype=torch.float64)
        for c, e in enumerate(embeddings[i], 1):
            ref += max(decay, 1.0 / c) * (e - ref)
        torch.testing.assert_close(profile.embedding[i].double(), ref, rtol=1e-5, atol=1e-6)
    if decay == 1.0:  # nothing but the last visit counts
        last = {i: h[-1] for i, h in history.items() if h}
        for i, v in last.items():
            assert profile.loss[i].item() == pytest.approx(v, rel=1e-6)


@pytest.mark.parametrize("decay", [0.1, 0.6])
def test_decay_with_an_id_repeated_in_a_batch_moves_it_toward_the_copies_mean(decay):
    """n copies of an id seen c times before move it by max(decay, n / (c + n)) toward their mean,
    whatever the batch's order (the copies are counted by a sort of the batch, not a table of N)."""
    profile = ErrorProfile(9, 2, decay=decay)
    for _ in range(6):  # id 4 seen 6 times before, id 7 twice
        profile.update(torch.tensor([4]), torch.tensor([1.0]), torch.ones(1, 2))
    for _ in range(2):
        profile.update(torch.tensor([7]), torch.tensor([2.0]), torch.zeros(1, 2))
    ids = torch.tensor([7, 4, 0, 4, 7, 4])
    losses = torch.tensor([5.0, 3.0, 9.0, 4.0, 6.0, 8.0])
    profile.update(ids, losses, losses.unsqueeze(1).expand(-1, 2))
    for i, before, copies, old in ((4, 6, 3, 1.0), (7, 2, 2, 2.0), (0, 0, 1, 0.0)):
        mean = float(losses[ids == i].mean())
        w = max(decay, copies / (before + copies))
        expected = old + w * (mean - old)
        assert profile.loss[i].item() == pytest.approx(expected, rel=1e-6)
        assert profile.count[i].item() == before + copies


def test_decay_after_a_change_tracks_the_new_loss_where_the_mean_lags():
    mean, decayed = ErrorProfile(1, 1), ErrorProfile(1, 1, decay=0.5)
    ids, emb = torch.zeros(1, dtype=torch.int64), torch.zeros(1, 1)
    for loss in [4.0] * 10 + [0.0] * 3:
        mean.update(ids, torch.tensor([loss]), emb)
        decayed.update(ids, torch.tensor([loss]), emb)
    assert mean.loss.item() == pytest.approx(40 / 13)
    assert decayed.loss.item() == pytest.approx(0.5)  # 4 -> 2 -> 1 -> 0.5


def test_decay_with_an_id_repeated_in_one_batch_moves_toward_the_batch_mean():
    profile = ErrorProfile(2, 1, decay=0.25)
    emb = torch.zeros(1, 1)
    for _ in range(8):  # 8 visits: the 1/c weight has fallen below the decay
        profile.update(torch.tensor([0]), torch.tensor([1.0]), emb)
    profile.update(torch.tensor([0, 0]), torch.tensor([3.0, 5.0]), torch.zeros(2, 1))
    # two copies: w = max(0.25, 2/10) = 0.25 toward their mean 4
    assert profile.loss[0].item() == pytest.approx(1.0 + 0.25 * 3.0)


@pytest.mark.parametrize("decay", [0.0, -0.1, 1.5, float("nan"), "0.5x"])
def test_bad_decay_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        ErrorProfile(3, 2, decay=decay)
