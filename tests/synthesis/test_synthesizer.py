"""SAGESynthesizer on planted data, without any model: the profile, a round's two halves, the pool,
the state, and the seam a background planner would use."""
import threading

import pytest
import torch

pytest.importorskip("umap")

from sage_fast.synthesis import (ProfileSnapshot, RoundRecord, SAGESynthesizer, SynthesisConfig,  # noqa: E402
                                 SynthesisPlan, SyntheticRows, plan_round)

N, DIM, L, D_T, C = 60, 6, 5, 4, 3
HARD = torch.arange(N) < 15  # the first cluster is where the student does worst


def planted():
    """Three clusters of pooled embeddings; losses high in the first one."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[8.0] * DIM, [0.0] * DIM, [-8.0] * DIM])
    cluster = torch.cat([torch.zeros(15), torch.ones(20), torch.full((25,), 2.0)]).long()
    embeddings = centres[cluster] + 0.5 * torch.randn(N, DIM, generator=g)
    losses = torch.where(HARD, 3.0, 0.2) + 0.05 * torch.rand(N, generator=g)
    return embeddings, losses


# Each real row's vectors are its id in every element, lengths 2..L: easy to check what was mixed.
LENGTHS = 2 + torch.arange(N) % (L - 1)


def vectors_of(ids):
    ids = ids.cpu()
    vectors = ids.float().view(-1, 1, 1).expand(-1, L, D_T).clone()
    mask = (torch.arange(L).view(1, -1) < LENGTHS[ids].view(-1, 1)).long()
    return vectors, mask


def label(vectors, mask):
    """A stand-in teacher: logits from the vectors' mean, one hidden layer equal to the vectors."""
    mean = vectors.mean(dim=(1, 2))
    return torch.stack([mean, -mean, mean * 0.5], dim=1), {2: vectors.half()}


def synthesizer(**settings):
    config = SynthesisConfig(**{"synthetic_per_round": 16, "pool_size": 40, "n_neighbors": 5, "seed": 3, **settings})
    synth = SAGESynthesizer(config, num_examples=N, embedding_dim=DIM)
    embeddings, losses = planted()
    synth.observe(torch.arange(N), losses, embeddings)
    return synth


@pytest.fixture(scope="module")
def after_one_round():
    synth = synthesizer()
    plan = synth.plan(step=7)
    record = synth.build(plan, vectors_of, label)
    return synth, plan, record


def test_a_round_interpolates_labels_and_pools(after_one_round):
    synth, plan, record = after_one_round
    assert isinstance(record, RoundRecord)
    assert (record.round, record.step, record.examples, record.synthetic, record.pool_size) == (1, 7, N, 16, 16)
    assert synth.rounds == 1 and len(synth.pool) == 16
    for seconds in (record.analysis_seconds, record.synthesis_seconds, record.labelling_seconds):
        assert seconds >= 0
    # The pool holds lam * x_a + (1 - lam) * x_b, the OR of the masks, and what label() said of them.
    a, b, lam = plan.anchor_ids.float(), plan.partner_ids.float(), plan.lam.float()
    expected = (lam * a + (1 - lam) * b).view(-1, 1, 1).expand(-1, L, D_T)
    assert torch.allclose(synth.pool.vectors[:16], expected, rtol=1e-6, atol=1e-5)
    lengths = torch.maximum(LENGTHS[plan.anchor_ids], LENGTHS[plan.partner_ids])
    assert torch.equal(synth.pool.masks[:16].sum(1), lengths)
    logits, hidden = label(synth.pool.vectors[:16], synth.pool.masks[:16])
    assert torch.equal(synth.pool.logits[:16], logits)
    assert torch.equal(synth.pool.hidden[2][:16], hidden[2])
    assert plan.lam.min() >= 0.3 and plan.lam.max() <= 0.7


def test_sage_anchors_come_from_the_hard_region_and_random_ones_do_not(after_one_round):
    _, plan, record = after_one_round
    scores = plan.analyzer.region_score_
    assert bool((scores[plan.anchors] >= record.threshold).all())
    assert HARD[plan.anchor_ids].float().mean() > 0.9
    random_plan = synthesizer(mode="random", synthetic_per_round=40).plan()
    assert HARD[random_plan.anchor_ids].float().mean() < 0.6  # a quarter of the rows are hard


def test_inverse_mode_draws_partners_through_the_map():
    plan = synthesizer(mode="inverse").plan()
    assert plan.analyzer.mode == "inverse"
    assert bool((plan.anchor_ids != plan.partner_ids).all())


def test_planning_is_pure_and_repeatable():
    synth = synthesizer()
    before = synth.analysis_generator.get_state()
    first, second = synth.plan(), synth.plan()
    assert synth.rounds == 0 and torch.equal(synth.analysis_generator.get_state(), before) and len(synth.pool) == 0
    for name in ("anchors", "partners", "lam"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert first.round == 1 and first.noise_seed == 3 * 1000 + 1


def test_plans_are_built_once_and_in_order():
    synth = synthesizer()
    plan = synth.plan()
    synth.build(plan, vectors_of, label)
    with pytest.raises(ValueError, match="round 1 but the synthesizer is at round 1"):
        synth.build(plan, vectors_of, label)
    with pytest.raises(ValueError, match="plan must be a SynthesisPlan"):
        synth.build("plan", vectors_of, label)


def test_a_plan_made_in_a_worker_from_a_snapshot_gives_the_same_round():
    """The seam for planning beside training: the snapshot is taken at one step, training goes on
    updating the profile, the plan is built later; the result is the same as planning inline."""
    inline, threaded = synthesizer(), synthesizer()
    inline_plan = inline.plan()
    snapshot = threaded.snapshot()
    assert isinstance(snapshot, ProfileSnapshot) and snapshot.round == 1
    result = {}
    worker = threading.Thread(target=lambda: result.update(plan=plan_round(snapshot, threaded.config)))
    worker.start()
    g = torch.Generator().manual_seed(5)
    for synth in (inline, threaded):  # training goes on: the profile changes under the worker
        synth.observe(torch.arange(10), torch.rand(10, generator=g) * 9, torch.randn(10, DIM, generator=g))
    worker.join()
    assert isinstance(result["plan"], SynthesisPlan)
    inline.build(inline_plan, vectors_of, label)
    threaded.build(result["plan"], vectors_of, label)
    assert torch.equal(inline.pool.vectors, threaded.pool.vectors)
    assert torch.equal(inline.analysis_generator.get_state(), threaded.analysis_generator.get_state())


def test_too_few_rows_seen_means_no_round():
    synth = SAGESynthesizer(SynthesisConfig(synthetic_per_round=4, pool_size=8), num_examples=N, embedding_dim=DIM)
    assert synth.round(vectors_of, label) is None and synth.plan() is None
    synth.observe(torch.arange(7), torch.rand(7), torch.randn(7, DIM))
    assert synth.seen == 7 and synth.round(vectors_of, label) is None and synth.rounds == 0


def test_sample_draws_from_the_pool(after_one_round):
    synth = synthesizer()
    assert synth.sample(4) is None
    synth.round(vectors_of, label)
    rows = synth.sample(5)
    assert isinstance(rows, SyntheticRows) and len(rows) == 5
    assert rows.vectors.shape == (5, L, D_T) and rows.mask.shape == (5, L) and rows.logits.shape == (5, C)
    assert set(rows.hidden) == {2}
    assert len(synth.sample(100)) == 16 and synth.sample(0) is None
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(synth.sample(3, g1).vectors, synth.sample(3, g2).vectors)


def test_state_round_trip_continues_bit_identically():
    g = torch.Generator().manual_seed(1)
    extra = [(torch.randint(0, N, (12,), generator=g), torch.rand(12, generator=g) * 4,
              torch.randn(12, DIM, generator=g)) for _ in range(3)]
    straight = synthesizer(pool_policy="reservoir", noise_std=0.1)
    straight.round(vectors_of, label)
    saved = straight.state_dict()
    with pytest.raises(ValueError, match="saved with seed 3 \\(this one: 99\\)"):
        synthesizer(pool_policy="reservoir", noise_std=0.1, seed=99).load_state_dict(saved)
    resumed = SAGESynthesizer(straight.config, num_examples=N, embedding_dim=DIM)
    resumed.load_state_dict(saved)
    assert resumed.rounds == 1 and len(resumed.pool) == 16
    for synth in (straight, resumed):
        for batch in extra:
            synth.observe(*batch)
        synth.round(vectors_of, label)
        synth.round(vectors_of, label)
    assert straight.rounds == resumed.rounds == 3
    for name in ("vectors", "masks", "logits"):
        assert torch.equal(getattr(straight.pool, name), getattr(resumed.pool, name)), name
    assert torch.equal(straight.profile.loss, resumed.profile.loss)
    assert torch.equal(straight.sample(8).vectors, resumed.sample(8).vectors)


def test_refresh_replaces_the_profile():
    synth = synthesizer()
    ids = torch.arange(0, N, 2)
    synth.refresh([(ids, torch.full((ids.numel(),), 7.0), torch.zeros(ids.numel(), DIM))])
    assert torch.equal(synth.profile.loss[ids], torch.full((ids.numel(),), 7.0))
    assert synth.profile.loss[1] < 4  # rows the pass did not visit keep their values


def test_round_writes_the_loss_map_or_says_why_not(tmp_path, monkeypatch):
    synth = synthesizer()
    record = synth.round(vectors_of, label, step=3, plot_path=lambda n: tmp_path / f"map{n:02d}.png")
    assert record.png == str(tmp_path / "map01.png") and (tmp_path / "map01.png").is_file()
    assert record.plot_error is None and record.plot_seconds > 0

    def no_matplotlib(*args, **kwargs):
        raise ImportError("the loss map needs matplotlib")

    monkeypatch.setattr("sage_fast.synthesis.synthesizer.loss_map", no_matplotlib)
    record = synth.round(vectors_of, label, plot_path=tmp_path / "map.png")
    assert record.png is None and "matplotlib" in record.plot_error and record.round == 2


@pytest.mark.parametrize("settings,message", [
    (dict(mode="kd"), "mode must be one of"),
    (dict(synthetic_per_round=True), "synthetic_per_round must be an integer"),
    (dict(synthetic_per_round=0), "synthetic_per_round must be an integer in"),
    (dict(pool_size=8, synthetic_per_round=16), "pool_size \\(8\\) must be at least synthetic_per_round"),
    (dict(pool_policy="lifo"), "pool_policy must be one of"),
    (dict(quantile=1.0), "quantile must be in"),
    (dict(n_neighbors=1), "n_neighbors must be an integer in"),
    (dict(lam_low=0.8, lam_high=0.2), "lam_low \\(0.8\\) must not exceed lam_high"),
    (dict(noise_std=-1.0), "noise_std must be in"),
    (dict(seed=-1), "seed must be an integer in"),
    (dict(device="gpu"), "device must be"),
    (dict(min_examples=2), "min_examples must be an integer in"),
])
def test_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        SynthesisConfig(**settings)


def test_bad_arguments():
    config = SynthesisConfig(synthetic_per_round=4, pool_size=8, n_neighbors=5)
    with pytest.raises(ValueError, match="config must be a SynthesisConfig"):
        SAGESynthesizer({"mode": "sage"}, num_examples=N, embedding_dim=DIM)
    with pytest.raises(ValueError, match="num_examples must be an integer"):
        SAGESynthesizer(config, num_examples=0, embedding_dim=DIM)
    with pytest.raises(ValueError, match="embedding_dim must be an integer"):
        SAGESynthesizer(config, num_examples=N, embedding_dim=True)
    synth = synthesizer(synthetic_per_round=4, pool_size=8)
    with pytest.raises(ValueError, match="embeddings must have 6 columns"):
        synth.observe(torch.arange(3), torch.rand(3), torch.randn(3, DIM + 1))
    with pytest.raises(ValueError, match="vectors_of must return vectors"):
        synth.round(lambda ids: vectors_of(ids[:-1]), label)
    with pytest.raises(ValueError, match="vectors_of must return a mask"):
        synth.round(lambda ids: (vectors_of(ids)[0], vectors_of(ids)[1][:, :2]), label)
    with pytest.raises(ValueError, match="count must be an integer"):
        synth.plan(count=0)
    with pytest.raises(ValueError, match="state is missing"):
        synth.load_state_dict({"rounds": 0})
