"""The generators of a round's build step, on planted tokens and tiny models: substitution (real
token ids, their nearest neighbours, the share, the partner's span), boundary steps (bounded, toward
more disagreement), determinism by seed, and what each needs before any work."""
from types import SimpleNamespace

import pytest
import torch

from sage_fast.synthesis import GeneratorInputs, SAGESynthesizer, SynthesisConfig
from sage_fast.synthesis.generators import Boundary, Substitution, disagreement, make_generator, nearest_tokens
from sage_fast.synthesis.generators.substitution import pick_share

V, D, L = 40, 6, 9
PAD, CLS, SEP = 0, 1, 2
SPECIAL = torch.tensor([PAD, CLS, SEP])


def table(seed=0):
    return torch.randn(V, D, generator=torch.Generator().manual_seed(seed))


def replaceable():
    allowed = torch.ones(V, dtype=torch.bool)
    allowed[SPECIAL] = False
    return allowed


def corpus(n=30, seed=1):
    """``n`` rows ``[CLS] words [SEP] pad...`` of 1 to L - 2 words (ids 3..V-1), one row a single word."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((n, L), PAD)
    lengths = torch.randint(1, L - 1, (n,), generator=g)
    lengths[0] = 1
    for i, k in enumerate(lengths.tolist()):
        tokens[i, 0], tokens[i, 1:k + 1], tokens[i, k + 1] = CLS, torch.randint(3, V, (k,), generator=g), SEP
    return tokens, (tokens != PAD).long()


TOKENS, MASK = corpus()


def tokens_of(ids):
    return TOKENS[ids.cpu()], MASK[ids.cpu()]


def vectors_of(ids, weights=None):
    weights = table() if weights is None else weights
    return weights[TOKENS[ids.cpu()]], MASK[ids.cpu()]


def plan(m=24, seed=5, noise_seed=7):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(anchor_ids=torch.randint(0, TOKENS.shape[0], (m,), generator=g),
                           partner_ids=torch.randint(0, TOKENS.shape[0], (m,), generator=g),
                           lam=torch.rand(m, generator=g), noise_seed=noise_seed, labels=None)


def substitution(**settings):
    config = SynthesisConfig(**{"generator": "substitute", "substitute_top_k": 3, **settings})
    return make_generator(config)


def inputs(**extra):
    return GeneratorInputs(tokens_of=tokens_of, embedding_table=table(), replaceable=replaceable(), **extra)


def reference_neighbours(weights, token, k, allowed):
    """The top-k cosine neighbours of one token, in float64, by sorting every candidate."""
    unit = torch.nn.functional.normalize(weights.double(), dim=1)
    sims = unit @ unit[token]
    candidates = [j for j in range(V) if allowed[j] and j != token]
    return set(sorted(candidates, key=lambda j: -float(sims[j]))[:k])


@pytest.mark.parametrize("k", [1, 3, 7])
def test_nearest_tokens_are_the_top_k_cosine_neighbours(k, seed):
    weights = table(seed) * torch.logspace(0, 3, V).unsqueeze(1)  # norms over three orders: cosine ignores them
    queries = torch.arange(3, V)
    got = nearest_tokens(weights, queries, k, replaceable(), block=5)  # several blocks, one partial
    assert got.shape == (V - 3, k)
    for q, row in zip(queries.tolist(), got.tolist()):
        assert set(row) == reference_neighbours(weights, q, k, replaceable()), q


@pytest.mark.parametrize("share", [0.0, 0.15, 0.5, 1.0])
def test_substitution_replaces_the_share_with_real_neighbouring_tokens(share):
    gen, given, p = substitution(substitute_share=share), inputs(), plan()
    rows = gen.generate(p, vectors_of, None, given)
    source, mask = TOKENS[p.anchor_ids], MASK[p.anchor_ids]
    assert rows.tokens.shape == source.shape and rows.tokens.dtype == torch.int64
    assert torch.equal(rows.source_tokens, source) and torch.equal(rows.mask, mask)
    assert rows.tokens.min() >= 0 and rows.tokens.max() < V
    assert torch.equal(rows.vectors, table()[rows.tokens])  # the rows are the tokens' own vectors
    changed = rows.tokens != source
    eligible = mask.bool() & replaceable()[source]
    assert not (changed & ~eligible).any()  # special tokens and padding stay
    expected = torch.floor(share * eligible.sum(1).double() + 0.5).long()
    assert torch.equal(changed.sum(1), expected)  # a neighbour is never the token itself
    for i, j in changed.nonzero().tolist():
        new = int(rows.tokens[i, j])
        assert replaceable()[new] and new in reference_neighbours(table(), int(source[i, j]), 3, replaceable())


def test_substitution_is_fixed_by_the_round_seed():
    gen = substitution(substitute_share=0.5, substitute_span=0.5)
    first = gen.generate(plan(), vectors_of, None, inputs())
    again = substitution(substitute_share=0.5, substitute_span=0.5).generate(plan(), vectors_of, None, inputs())
    other = gen.generate(plan(noise_seed=8), vectors_of, None, inputs())
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.vectors, again.vectors)
    assert not torch.equal(first.tokens, other.tokens)


@pytest.mark.parametrize("span", [0.5, 1.0])
def test_a_span_of_the_partner_replaces_as_many_of_the_anchor_s_pieces(span):
    gen, p = substitution(substitute_share=0.0, substitute_span=span), plan(m=40)
    rows = gen.generate(p, vectors_of, None, inputs())
    allowed = replaceable()
    for i in range(40):
        a, b = TOKENS[p.anchor_ids[i]], TOKENS[p.partner_ids[i]]
        own = [t for t, m in zip(a.tolist(), MASK[p.anchor_ids[i]].tolist()) if m and allowed[t]]
        theirs = [t for t, m in zip(b.tolist(), MASK[p.partner_ids[i]].tolist()) if m and allowed[t]]
        got = [t for t, m in zip(rows.tokens[i].tolist(), rows.mask[i].tolist()) if m and allowed[t]]
        size = min(int(span * len(theirs) + 0.5), len(own))
        assert len(got) == len(own)
        # some start in the anchor holds some run of the partner; everything else is the anchor's
        fits = [(s, q) for s in range(len(own) - size + 1) for q in range(len(theirs) - size + 1)
                if got[s:s + size] == theirs[q:q + size] and got[:s] == own[:s] and got[s + size:] == own[s + size:]]
        assert fits, (own, theirs, got)
        specials = [(t, m) for t, m in zip(a.tolist(), MASK[p.anchor_ids[i]].tolist()) if not (m and allowed[t])]
        assert specials == [(t, m) for t, m in zip(rows.tokens[i].tolist(), rows.mask[i].tolist())
                            if not (m and allowed[t])]


def test_pick_share_draws_exact_counts_on_odd_rows():
    eligible = torch.tensor([[True] * 7, [False] * 7, [True, False] * 3 + [True]])
    chosen = pick_share(eligible, 0.3, torch.Generator().manual_seed(0))
    assert chosen.sum(1).tolist() == [2, 0, 1] and not (chosen & ~eligible).any()


# ------------------------------------------------------------------------------------ boundary
class Tiny(torch.nn.Module):
    """A tiny classifier on vectors: a tanh layer, a masked mean, a linear head."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inner = torch.nn.Parameter(torch.randn(D, 8, generator=g))
        self.head = torch.nn.Parameter(torch.randn(8, 3, generator=g))

    def forward(self, x, mask):
        keep = mask.unsqueeze(-1).to(x.dtype)
        pooled = (torch.tanh(x @ self.inner) * keep).sum(1) / keep.sum(1).clamp_min(1)
        return pooled @ self.head


def forward(module, vectors, mask):  # the generators' student_forward
    return module(vectors, mask)


def boundary_setting(steps=3, size=0.1):
    teacher, student = Tiny(0), Tiny(1)
    config = SynthesisConfig(generator="boundary", boundary_steps=steps, boundary_step_size=size)

    def label(vectors, mask):
        with torch.no_grad():
            return teacher(vectors, mask), {}

    return make_generator(config), label, teacher, student


@pytest.mark.parametrize("steps, size", [(1, 0.05), (3, 0.1), (5, 0.2)])
def test_boundary_steps_are_bounded_and_raise_the_disagreement(steps, size):
    gen, label, teacher, student = boundary_setting(steps, size)
    given = GeneratorInputs(student=student, student_forward=forward, batch_size=7, temperature=2.0)  # partial chunk
    p = plan(m=24)
    rows = gen.generate(p, vectors_of, label, given)
    start, mask = vectors_of(p.anchor_ids)
    assert rows.vectors.shape == start.shape and torch.equal(rows.mask, mask) and rows.tokens is None
    moved = (rows.vectors - start).norm(dim=-1)                                   # [m, L]
    keep = mask.bool()
    assert (moved[~keep] == 0).all()  # padding never moves
    scale = (start.norm(dim=-1) * keep).sum(1) / keep.sum(1)
    assert (moved.amax(1) <= steps * size * scale * (1 + 1e-5)).all()
    assert (moved.amax(1) > 0).all()
    with torch.no_grad():
        before = disagreement(student(start, mask), teacher(start, mask), 2.0)
        after = disagreement(student(rows.vectors, mask), teacher(rows.vectors, mask), 2.0)
    assert after.mean() > before.mean() and (after > before).float().mean() > 0.8
    assert all(p.grad is None for p in student.parameters())  # training's gradients are left alone
    again = gen.generate(p, vectors_of, label, given)
    assert torch.equal(rows.vectors, again.vectors)


def test_boundary_keeps_large_magnitudes_in_scale():
    gen, label, teacher, student = boundary_setting(2, 0.05)
    weights = table() * 1e3
    p = plan(m=5)
    rows = gen.generate(p, lambda ids: vectors_of(ids, weights), label,
                        GeneratorInputs(student=student, student_forward=forward))
    start, mask = vectors_of(p.anchor_ids, weights)
    assert torch.isfinite(rows.vectors).all()
    scale = (start.norm(dim=-1) * mask).sum(1) / mask.sum(1)
    assert ((rows.vectors - start).norm(dim=-1).amax(1) <= 2 * 0.05 * scale * (1 + 1e-5)).all()


# ------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("settings, word", [
    ({"generator": "mixup"}, "generator"),
    ({"substitute_share": 1.5}, "substitute_share"),
    ({"substitute_share": -0.1}, "substitute_share"),
    ({"substitute_span": 2.0}, "substitute_span"),
    ({"substitute_top_k": 0}, "substitute_top_k"),
    ({"boundary_steps": 0}, "boundary_steps"),
    ({"boundary_step_size": 0.0}, "boundary_step_size"),
    ({"boundary_step_size": float("inf")}, "boundary_step_size"),
    ({"generator": "boundary", "partners": "boundary"}, "partners"),
])
def test_bad_generator_settings_name_the_setting(settings, word):
    with pytest.raises(ValueError, match=word):
        SynthesisConfig(**settings)


@pytest.mark.parametrize("generator, given, word", [
    ("boundary", GeneratorInputs(), "student, student_forward.*vector interface"),
    ("boundary", GeneratorInputs(student=torch.nn.Linear(2, 2)), "student_forward.*vector interface"),
    ("substitute", GeneratorInputs(embedding_table=table()), "tokens_of"),
    ("substitute", GeneratorInputs(tokens_of=tokens_of), "embedding_table"),
    ("substitute", GeneratorInputs(tokens_of=tokens_of, embedding_table=table(), replaceable=torch.ones(3).bool()),
     "replaceable"),
])
def test_a_generator_without_what_it_reads_stops_before_any_work(generator, given, word):
    config = SynthesisConfig(generator=generator)
    with pytest.raises(ValueError, match=word):
        SAGESynthesizer(config, num_examples=10, embedding_dim=4, inputs=given)


def test_top_k_must_leave_room_in_the_vocabulary():
    config = SynthesisConfig(generator="substitute", substitute_top_k=V - 3)
    with pytest.raises(ValueError, match="substitute_top_k"):
        SAGESynthesizer(config, num_examples=10, embedding_dim=4, inputs=inputs())


def test_a_substitution_round_pools_its_rows_and_shows_a_few_decoded():
    pytest.importorskip("umap")
    n = TOKENS.shape[0]
    config = SynthesisConfig(generator="substitute", substitute_share=0.5, substitute_top_k=3, synthetic_per_round=12,
                             pool_size=24, n_neighbors=5, seed=1)
    words = {PAD: "[PAD]", CLS: "[CLS]", SEP: "[SEP]"}
    synth = SAGESynthesizer(config, num_examples=n, embedding_dim=3,
                            inputs=inputs(decode=lambda ids: " ".join(words.get(int(t), f"w{int(t)}") for t in ids)))
    g = torch.Generator().manual_seed(0)
    synth.observe(torch.arange(n), torch.rand(n, generator=g), torch.randn(n, 3, generator=g))
    record = synth.round(vectors_of, lambda v, m: (v.sum(dim=(1, 2)).unsqueeze(1).repeat(1, 2), {}))
    assert record.synthetic == 12 and len(synth.pool) == 12
    assert len(record.decoded) == 3 and all(" -> " in line and "teacher: class" in line for line in record.decoded)
    assert record.decoded[0].startswith("'[CLS]")


def test_replaceable_tokens_leave_out_special_and_placeholder_tokens():
    from sage_fast.synthesis.generators import replaceable_tokens

    class Tokenizer:
        all_special_ids = [0, 1]

        def get_vocab(self):
            return {"[PAD]": 0, "[CLS]": 1, "good": 2, "[unused3]": 3, "<mask>": 4, "##s": 5, "[": 6, "<>": 7}

    allowed = replaceable_tokens(Tokenizer(), 9)  # a table with a row the tokenizer does not know
    assert allowed.tolist() == [False, False, True, False, False, True, True, True, False]
