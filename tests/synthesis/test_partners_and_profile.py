"""The synthesizer's choices about its profile and its partners: boundary and same-label partners,
the gold labels of same-label rows, classes kept with the profile and its state, a decaying profile,
and the driver's profile signal."""
import pytest
import torch

from sage_fast.synthesis import SAGESynthesizer, SynthesisConfig, SyntheticRows, partner_classes
from sage_fast.synthesis.synthesizer import class_partners, row_labels


def _graph():
    # 6 points; each row lists its map neighbours
    neighbours = torch.tensor([[1, 2, 3], [0, 2, 4], [0, 1, 5], [4, 5, 0], [3, 5, 1], [3, 4, 2]])
    classes = torch.tensor([0, 0, 1, 1, 1, 1])
    return neighbours, classes


def test_boundary_partner_is_a_neighbour_of_another_class_whenever_one_exists():
    neighbours, classes = _graph()
    anchors = torch.tensor([0, 1, 2, 3, 4, 5] * 20)
    given = torch.full_like(anchors, 99)
    partners = class_partners(neighbours, classes, anchors, given, torch.Generator().manual_seed(0))
    for a, p in zip(anchors.tolist(), partners.tolist()):
        others = [n for n in neighbours[a].tolist() if classes[n] != classes[a]]
        if others:
            assert p in others, (a, p)
        else:  # 4's neighbours (3, 5, 1): 1 is of class 0; 5's (3, 4, 2) are all class 1
            assert p == 99, (a, p)
    # the choice is spread over the candidates, not always the first
    assert set(partners[anchors == 0].tolist()) == {2, 3}


def test_same_label_partner_is_a_neighbour_of_the_anchor_s_class_whenever_one_exists():
    neighbours, classes = _graph()
    neighbours[2] = torch.tensor([0, 1, 0])  # 2 (class 1) now has no neighbour of its class
    anchors = torch.tensor([0, 1, 2, 3, 4, 5] * 20)
    given = torch.full_like(anchors, 99)
    partners = class_partners(neighbours, classes, anchors, given, torch.Generator().manual_seed(0), same=True)
    for a, p in zip(anchors.tolist(), partners.tolist()):
        alike = [n for n in neighbours[a].tolist() if classes[n] == classes[a]]
        assert (p in alike) if alike else (p == 99), (a, p)
    assert set(partners[anchors == 3].tolist()) == {4, 5}  # spread over the candidates
    kept = anchors != 2
    assert torch.equal(row_labels(classes, anchors[kept], partners[kept]), classes[anchors[kept]])


def test_row_labels_are_the_shared_class_or_none():
    classes = torch.tensor([0, 1, 1, -1])
    anchors, partners = torch.tensor([0, 1, 1, 3, 0]), torch.tensor([0, 2, 0, 3, 3])
    assert row_labels(classes, anchors, partners).tolist() == [0, 1, -1, -1, -1]


def test_loop_helpers_for_classes_and_synthetic_labels():
    teacher = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    gold = torch.tensor([1, 1])
    assert partner_classes("neighbours", teacher, gold) is None
    assert partner_classes("boundary", teacher, gold).tolist() == [0, 1]
    assert partner_classes("same-label", teacher, gold) is gold
    with pytest.raises(ValueError, match="gold labels"):
        partner_classes("same-label", teacher, None)
    rows = SyntheticRows(torch.zeros(3, 2, 4), torch.ones(3, 2), torch.zeros(3, 2))
    assert rows.loss_labels(-100).tolist() == [-100] * 3
    rows.labels = torch.tensor([1, -1, 0])
    assert rows.loss_labels(-100).tolist() == [1, -100, 0]


def test_boundary_partners_keep_the_given_partner_where_classes_are_unknown():
    neighbours, classes = _graph()
    classes = torch.full_like(classes, -1)
    anchors = torch.arange(6)
    given = torch.tensor([1, 2, 0, 4, 5, 3])
    for same in (False, True):
        assert torch.equal(class_partners(neighbours, classes, anchors, given, torch.Generator(), same=same), given)


def _observed(**settings):
    g = torch.Generator().manual_seed(0)
    n, dim = 40, 4
    centres = torch.tensor([[5.0] * dim, [-5.0] * dim])
    side = (torch.arange(n) % 2)
    embeddings = centres[side] * 0.06 + torch.randn(n, dim, generator=g)  # the two classes overlap
    config = SynthesisConfig(**{"synthetic_per_round": 64, "pool_size": 64, "n_neighbors": 6, "seed": 1, **settings})
    synth = SAGESynthesizer(config, num_examples=n, embedding_dim=dim)
    synth.observe(torch.arange(n), torch.rand(n, generator=g), embeddings, classes=side)
    return synth, side


def test_boundary_rounds_mix_across_classes_more_than_neighbour_rounds():
    mixed = {}
    for partners in ("neighbours", "boundary"):
        synth, side = _observed(partners=partners)
        plan = synth.plan()
        a, p = plan.anchor_ids, plan.partner_ids
        mixed[partners] = float((side[a] != side[p]).float().mean())
    assert mixed["boundary"] > mixed["neighbours"] + 0.2, mixed
    assert mixed["boundary"] > 0.9, mixed


def test_same_label_rounds_mix_within_a_class_and_their_rows_carry_it_to_the_pool():
    synth, side = _observed(partners="same-label")
    plan = synth.plan()
    a, p = plan.anchor_ids, plan.partner_ids
    assert float((side[a] == side[p]).float().mean()) > 0.9
    shared = side[a] == side[p]
    assert torch.equal(plan.labels[shared], side[a][shared]) and bool((plan.labels[~shared] == -1).all())
    vectors = torch.randn(40, 3, 2)

    def vectors_of(ids):
        return vectors[ids], torch.ones(len(ids), 3, dtype=torch.long)

    def label(v, mask):
        return v.mean(dim=(1, 2)).unsqueeze(1).repeat(1, 2), {}

    synth.build(plan, vectors_of, label)
    assert torch.equal(synth.pool.labels[:len(synth.pool)], plan.labels[:len(synth.pool)])
    index = synth.pool.draw(10, torch.Generator().manual_seed(0))
    drawn = synth.sample(10, torch.Generator().manual_seed(0))  # the same slots: each keeps its own label
    assert torch.equal(drawn.labels, synth.pool.labels[index]) and torch.equal(drawn.logits, synth.pool.logits[index])
    # the neighbours rule makes rows without a label
    plain, _ = _observed()
    assert plain.plan().labels is None


def test_classes_travel_with_the_state():
    synth, side = _observed(partners="boundary")
    state = synth.state_dict()
    assert torch.equal(state["classes"], side)
    other = SAGESynthesizer(synth.config, num_examples=40, embedding_dim=4)
    other.load_state_dict(state)
    assert torch.equal(other.classes, side)
    again = SAGESynthesizer(synth.config, num_examples=40, embedding_dim=4)
    with pytest.raises(ValueError, match="classes"):
        again.load_state_dict({k: v for k, v in state.items() if k != "classes"})


def test_observe_checks_classes():
    synth, _ = _observed()
    with pytest.raises(ValueError, match="classes must have one value per id"):
        synth.observe(torch.arange(3), torch.rand(3), torch.randn(3, 4), classes=torch.zeros(2, dtype=torch.long))


def test_profile_decay_reaches_the_profile():
    synth, _ = _observed(profile_decay=0.25)
    assert synth.profile.decay == 0.25
    assert _observed()[0].profile.decay is None


@pytest.mark.parametrize("settings,message", [
    (dict(partners="far"), "partners must be one of"),
    (dict(partners="boundary", mode="inverse"), "mode 'inverse' picks partners"),
    (dict(partners="same-label", mode="inverse"), "mode 'inverse' picks partners"),
    (dict(profile_decay=0.0), "profile_decay must be in"),
    (dict(profile_decay=2.0), "profile_decay must be in"),
])
def test_bad_knobs(settings, message):
    with pytest.raises(ValueError, match=message):
        SynthesisConfig(**settings)


def test_disagreement_signal_is_the_tempered_kl():
    from sage_fast.synthesis import profile_signal

    torch.manual_seed(0)
    s, t = torch.randn(7, 3) * 3, torch.randn(7, 3) * 3
    per_example = torch.rand(7)
    labels = torch.randint(0, 3, (7,))
    assert profile_signal("loss", per_example, s, t, labels, 2.0) is per_example
    got = profile_signal("disagreement", per_example, s, t, labels, 2.0)
    p_t = torch.softmax(t.double() / 2, -1)
    expected = 4 * (p_t * (torch.log_softmax(t.double() / 2, -1) - torch.log_softmax(s.double() / 2, -1))).sum(-1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert profile_signal("disagreement", per_example, t, t, labels, 2.0).abs().max() < 1e-6  # agreeing with the teacher: nothing to fix


def test_trusted_signal_keeps_the_loss_only_where_the_teacher_is_right():
    from sage_fast.synthesis import profile_signal

    teacher = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])  # predicts 0, 1, 0, 1
    labels = torch.tensor([0, 0, 0, 1])
    per_example = torch.tensor([0.5, 2.0, 0.25, 1.5])
    got = profile_signal("trusted", per_example, torch.zeros(4, 2), teacher, labels, 2.0)
    assert got.tolist() == [0.5, 0.0, 0.25, 1.5]  # row 1: the teacher says 1, the label 0
