"""The synthesis session every training loop drives: its round schedule, mixing real and synthetic
rows, the profile signal, and the rounds it makes inline and beside training."""
import pytest
import torch

pytest.importorskip("umap")

from sage_fast.synthesis import (Batch, RoundSchedule, SessionSettings, SynthesisSession,  # noqa: E402
                                 SyntheticRows, label_in_chunks, mix, profile_signal)
from test_synthesizer import label, planted, synthesizer, vectors_of  # noqa: E402


@pytest.mark.parametrize("every, lag, total, planned", [
    (None, None, 30, [(10, 19), (20, 29)]),    # three rounds an epoch, each joining one step before the next
    (None, None, 25, [(10, 19), (20, 24)]),    # the last joins before the last step
    (None, 0, 30, [(10, 10), (20, 20)]),       # inline
    (7, 3, 30, [(7, 10), (14, 17), (21, 24), (28, 29)]),
    (30, None, 30, []),                        # no round after the last step
])
def test_the_schedule_is_a_rule_of_step_counts(every, lag, total, planned):
    schedule = RoundSchedule.resolve(SessionSettings(analysis_every=every, analysis_lag=lag), 30, total)
    assert schedule.planned() == planned
    assert [s for s in range(total + 1) if schedule.due(s)] == [s for s, _ in planned]


@pytest.mark.parametrize("kwargs, message", [
    (dict(synthetic_per_batch=-1), "synthetic_per_batch"), (dict(analysis_every=0), "analysis_every"),
    (dict(analysis_lag=-1), "analysis_lag"), (dict(profile_signal="lose"), "profile_signal"),
    (dict(refresh_profile=1), "refresh_profile"), (dict(temperature=0.0), "temperature"),
])
def test_bad_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SessionSettings(**kwargs)


def test_a_refreshed_profile_needs_a_pass_over_the_rows():
    with pytest.raises(ValueError, match="profile_batches"):
        SynthesisSession(synthesizer(), vectors_of, label, SessionSettings(refresh_profile=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("real_width, synthetic_width, trim", [(5, 7, None), (7, 5, 6), (1, 1, None)])
def test_mix_pads_joins_and_trims_like_a_plain_reference(seed, real_width, synthetic_width, trim):
    g = torch.Generator().manual_seed(seed)
    n, m, d = 3, 2, 4
    real = Batch(torch.randn(n, real_width, d, generator=g, dtype=torch.float64) * 1e3,
                 torch.ones(n, real_width, dtype=torch.long), torch.randn(n, 2, generator=g, dtype=torch.float64),
                 {1: torch.randn(n, real_width, d, generator=g, dtype=torch.float64)}, torch.tensor([0, 1, 1]),
                 torch.ones(n, real_width, dtype=torch.long))
    synthetic = SyntheticRows(torch.randn(m, synthetic_width, d, generator=g), torch.ones(m, synthetic_width),
                              torch.randn(m, 2, generator=g), {1: torch.randn(m, synthetic_width, d, generator=g)},
                              labels=torch.tensor([1, -1]))
    out = mix(real, synthetic, ignore_index=-100, width=trim)
    full = max(real_width, synthetic_width)
    width = full if trim is None else trim

    def padded(t):
        return torch.cat([t.double(), t.new_zeros(t.shape[0], full - t.shape[1], *t.shape[2:]).double()], 1)

    torch.testing.assert_close(out.vectors, torch.cat([padded(real.vectors), padded(synthetic.vectors)])[:, :width])
    hidden = torch.cat([padded(real.hidden[1]), padded(synthetic.hidden[1])])
    torch.testing.assert_close(out.hidden[1], hidden[:, :width])
    assert torch.equal(out.mask, torch.cat([padded(real.mask), padded(synthetic.mask)]).long()[:, :width])
    token_types = torch.cat([padded(real.token_types), torch.zeros(m, full).double()]).long()
    assert torch.equal(out.token_types, token_types[:, :width])
    assert out.labels.tolist() == [0, 1, 1, 1, -100] and out.n_real == n
    torch.testing.assert_close(out.logits, torch.cat([real.logits, synthetic.logits.double()]))
    alone = mix(real, None, ignore_index=-100)
    assert alone.vectors is real.vectors and alone.labels is real.labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_profile_signals_against_a_float64_reference(seed):
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(5, 3, generator=g) * 10, torch.randn(5, 3, generator=g) * 10
    labels, loss = torch.randint(0, 3, (5,), generator=g), torch.rand(5, generator=g)
    assert profile_signal("loss", loss, student, teacher, labels, 2.0) is loss
    p_t = torch.softmax(teacher.double() / 2, -1)
    expected = 4 * (p_t * (p_t.log() - torch.log_softmax(student.double() / 2, -1))).sum(-1)
    torch.testing.assert_close(profile_signal("disagreement", loss, student, teacher, None, 2.0).double(), expected,
                               rtol=1e-5, atol=1e-5)  # computed in float32
    trusted = profile_signal("trusted", loss, student, teacher, labels, 2.0)
    assert torch.equal(trusted, torch.where(teacher.argmax(-1) == labels, loss, 0.0))
    with pytest.raises(ValueError, match="gold labels"):
        profile_signal("trusted", loss, student, teacher, None, 2.0)


def test_labels_come_in_chunks_as_the_whole():
    vectors, mask = vectors_of(torch.arange(7))

    def forward(v, m, hidden):
        logits, layers = label(v, m)
        return type("Out", (), {"logits": logits, "hidden_states": {2: layers[2].float()} if hidden else None})

    logits, hidden = label_in_chunks(forward, vectors, mask, [2], chunk=3)
    whole_logits, whole_hidden = label(vectors, mask)
    assert torch.equal(logits, whole_logits) and torch.equal(hidden[2], whole_hidden[2])
    assert hidden[2].dtype == torch.float16


def drive(lag):
    """Eight steps of a loop: twelve rows observed a step, one micro-batch; rounds every 3 steps."""
    synth = synthesizer()
    session = SynthesisSession(synth, vectors_of, label, SessionSettings(synthetic_per_batch=4, analysis_every=3,
                                                                          analysis_lag=lag))
    session.start(steps_per_epoch=9, total_steps=8)
    embeddings, losses = planted()
    drawn = []
    for step in range(1, 9):
        part, count = session.next_part(1)
        drawn.append(count)
        ids = torch.arange(12) + 12 * (step % 5)
        logits = torch.randn(12, 3, generator=torch.Generator().manual_seed(step))
        session.observe(ids, losses[ids], logits, logits, None, embeddings[ids].unsqueeze(1), None, [12])
        session.end_step(step)
    return session, drawn


def test_rounds_inline_and_beside_training_follow_the_schedule():
    inline, drawn = drive(0)
    assert [(r.round, r.step) for r in inline.records] == [(1, 3), (2, 6)]
    assert drawn == [0, 0, 0, 4, 4, 4, 4, 4]  # the pool has rows from the round after step 3 on
    beside, drawn = drive(2)
    assert [(r.round, r.snapshot_step, r.step) for r in beside.records] == [(1, 3, 5), (2, 6, 7)]
    assert beside.schedule.planned() == [(3, 5), (6, 7)]
    assert drawn == [0, 0, 0, 0, 0, 4, 4, 4]
    assert beside.seconds["background"] > 0 and "background" not in inline.seconds
    state = beside.state_dict()
    assert state["round_in_flight"] is None and state["synthesizer"]["rounds"] == 2
    with pytest.raises(ValueError, match="analysis_lag"):
        inline.load_state_dict({**state, "round_in_flight": {"snapshot": {}}})
