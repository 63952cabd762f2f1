"""SAGESynthesizer under two real processes (torch.distributed, gloo): each rank observes its own
rows, labels only its share of each round, and still holds the same profile and pool as one process
that saw every row; each rank's draw is its part of the one-process draw. For every generator:
substituted rows (token ids kept) and boundary steps (read from the student) are made alike on
every rank."""
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("umap")

sys.path.insert(0, str(Path(__file__).parent))
from test_synthesizer import D_T, DIM, N, label, planted, vectors_of  # noqa: E402

from sage_fast.distributed import World  # noqa: E402
from sage_fast.synthesis import GeneratorInputs, SAGESynthesizer, SynthesisConfig  # noqa: E402

WORLD = 2
STEPS = 3  # steps of 20 rows, each dealt out as rows[r::2]
VOCAB = 30
GENERATORS = {"interpolate": {}, "substitute": {"substitute_share": 0.5, "substitute_top_k": 3},
              "boundary": {"boundary_steps": 2, "boundary_step_size": 0.1}}


def config(**settings):
    return SynthesisConfig(**{"synthetic_per_round": 15, "pool_size": 40, "n_neighbors": 5, "seed": 3, **settings})


def generator_inputs() -> GeneratorInputs:
    """Token ids of every row, the table their vectors come from, and a small student on vectors
    (each process builds the same ones from the same seeds)."""
    g = torch.Generator().manual_seed(11)
    table = torch.randn(VOCAB, D_T, generator=g)
    _, mask = vectors_of(torch.arange(N))
    tokens = torch.randint(1, VOCAB, mask.shape, generator=g) * mask
    student = torch.nn.Linear(D_T, 3, bias=False)
    with torch.no_grad():
        student.weight.copy_(torch.randn(3, D_T, generator=g))

    def student_forward(module, vectors, mask):
        keep = mask.unsqueeze(-1).to(vectors.dtype)
        return module((vectors * keep).sum(1) / keep.sum(1))

    return GeneratorInputs(tokens_of=lambda ids: (tokens[ids.cpu()], mask[ids.cpu()]), embedding_table=table,
                           student=student, student_forward=student_forward)


def drive(world: World, labelled_rows: list, generator: str = "interpolate"):
    """Three steps of observations, one round, then four draws of 7 rows; what a rank ends with."""
    def counting_label(vectors, mask):
        labelled_rows.append(vectors.shape[0])
        return label(vectors, mask)

    synth = SAGESynthesizer(config(generator=generator, **GENERATORS[generator]), num_examples=N, embedding_dim=DIM,
                            world=world, inputs=generator_inputs())
    embeddings, losses = planted()
    for step in range(STEPS):
        rows = torch.arange(step * 20, (step + 1) * 20)
        mine = rows[world.rank::world.size]
        sizes = [len(rows[r::world.size]) for r in range(world.size)]
        synth.observe(mine, losses[mine], embeddings[mine], classes=(mine % 2), sizes=sizes)
    record = synth.round(vectors_of, counting_label)
    draws = [synth.sample(7) for _ in range(4)]
    return synth, record, draws


def _rank_main(rank: int, port: int, out: str, generator: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        labelled = []
        synth, record, draws = drive(World(rank=rank, size=WORLD), labelled, generator)
        torch.save({"state": synth.state_dict(), "threshold": record.threshold, "labelled": labelled,
                    "draws": [(d.vectors, d.logits, d.hidden[2], d.tokens) for d in draws]},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=list(GENERATORS))
def generator(request):
    return request.param


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, generator):
    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_rank_main, args=(_free_port(), str(out), generator), nprocs=WORLD, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process(generator):
    labelled = []
    synth, record, draws = drive(World(), labelled, generator)
    return synth, record, draws, labelled


def _same_state(a: dict, b: dict):
    assert a["rounds"] == b["rounds"] == 1
    for key in ("loss", "count", "embedding"):
        if key in a["profile"]:
            assert torch.equal(a["profile"][key], b["profile"][key]), key
    assert torch.equal(a["classes"], b["classes"])
    for key, value in a["pool"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["pool"][key]), key
        else:
            assert (value is None) == (b["pool"][key] is None), key
    assert torch.equal(a["pool_generator"], b["pool_generator"])
    assert torch.equal(a["analysis_generator"], b["analysis_generator"])


def test_every_rank_holds_the_one_process_profile_and_pool(ranks, one_process, generator):
    synth, record, _, _ = one_process
    reference = synth.state_dict()
    assert (reference["pool"]["tokens"] is not None) == (generator == "substitute")
    assert reference["profile"]["count"].sum() == STEPS * 20  # every row observed once, whichever rank had it
    for rank in ranks:
        _same_state(rank["state"], reference)
        assert rank["threshold"] == record.threshold


def test_each_rank_labels_only_its_share(ranks, one_process, generator):
    *_, labelled = one_process
    # Boundary steps read the teacher at every row's current point, on every rank (each makes every
    # row, so no rank waits for another's): the rows' final labels are what the ranks share.
    steps = [15] * GENERATORS[generator].get("boundary_steps", 0)
    assert labelled == steps + [15]
    assert [r["labelled"] for r in ranks] == [steps + [8], steps + [7]]  # the first rank takes the odd row


def test_each_rank_draws_its_part_of_the_one_process_draw(ranks, one_process):
    _, _, draws, _ = one_process
    for step, whole in enumerate(draws):
        for rank, result in enumerate(ranks):
            vectors, logits, hidden, tokens = result["draws"][step]
            assert torch.equal(vectors, whole.vectors[rank::WORLD])
            assert (tokens is None and whole.tokens is None) or torch.equal(tokens, whole.tokens[rank::WORLD])
            assert torch.equal(logits, whole.logits[rank::WORLD])
            assert torch.equal(hidden, whole.hidden[2][rank::WORLD])
        assert sum(r["draws"][step][0].shape[0] for r in ranks) == 7
