"""SAGE's augmentation as one component that any training loop can drive.

``SAGESynthesizer`` owns the error profile, the analyzer settings, its random generators and the
bounded synthetic pool. A training loop

1. calls ``observe(ids, per_example_loss, embeddings)`` after each step with the real rows' detached
   per-example losses and pooled student embeddings;
2. calls ``round(vectors_of, label)`` on its schedule (every R steps, or at the end of an epoch):
   the analyzer is fitted on the rows seen so far, anchor / partner / lam triples are drawn (mode
   ``sage``: from the high-loss regions; ``random``: anchors uniform, the baseline that shows what
   loss-awareness adds; ``inverse``: partners through the map's approximate inverse), the
   configured generator makes rows from them (``generators``: interpolation with the fused
   :func:`sage_fast.ops.interpolate`, nearest-neighbour word-piece substitution, or bounded steps
   toward the student's disagreement with the teacher), the caller's ``label`` callable (the
   teacher through the vector interface) labels them, and they are offered to the pool;
3. mixes ``sample(n)`` into its next batches.

The component never sees a model. ``vectors_of(ids) -> (vectors [n, L, d_t], mask [n, L])`` gives
the teacher-space input vectors of real training rows (by example id); ``label(vectors, mask) ->
(logits [M, C], hidden {teacher layer: [M, L, d_t]})`` gives the teacher's outputs on vectors.
Generators that need more (the rows' token ids, the teacher's embedding table, the student and
its logits on vectors) get it once, at construction: ``inputs``, a :class:`GeneratorInputs`.

A round is two halves with a clean seam between them:

- ``plan()``: ``snapshot()`` copies the seen rows of the profile, the round number and the analysis
  generator's state; :func:`plan_round` turns that snapshot alone into a :class:`SynthesisPlan`
  (kNN, UMAP, region scores, the triples). It touches no model and no state of the synthesizer, so
  it can run in a worker beside training; its result depends only on the snapshot and the settings.
- ``build(plan, vectors_of, label)``: the generator's rows, labelling, pool; it adopts the plan's round
  number and generator state. Plans are built in order, each once (checked), and the next snapshot
  is taken after the previous plan is built: so a worker that takes the snapshot at step ``s`` and
  whose plan is built at a fixed later step ``s + k`` gives the same run for the same seed, however
  long the analysis takes.

Every random number comes from the synthesizer's own generators (the analysis generator on the
synthesizer's device, seeded ``seed + 2``; the pool generator on the CPU, seeded ``seed + 1``; UMAP
and the interpolation noise from ``seed * 1000 + round``), and ``state_dict()`` holds them with the
profile and the pool, so a resumed run draws what an uninterrupted one would (bit-identical on CPU).

Several processes (``world``, a :class:`sage_fast.distributed.World`; ``torchrun``): ``observe``
gathers every rank's rows, so every rank holds the same profile and makes the same plan (same seed,
same snapshot: no plan is sent); ``synthesize`` interpolates every row of the plan (memory-bound and
cheap, from the rank's own copy of the data, so no token vectors cross the network) but labels only
this rank's share; ``commit`` gathers the labels, checks that every rank planned the same round,
and adds the same rows to every rank's pool; ``sample`` draws the same rows on every rank (same
generator) and returns this rank's part. The state is the same on every rank: rank 0 saves it.

Knobs left open on purpose: how the profile is kept (``profile`` is an ``ErrorProfile``: refreshed
with ``refresh`` / ``refreshing``; a decaying mean would be another profile class), how partners are
chosen (``plan_round``'s draw), how synthetic rows are weighted or tempered in the loss (fields of
:class:`SyntheticRows`) and whether unsure teacher labels are kept (a filter between ``label`` and
the pool in ``build``).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import _checks
from ..devices import resolve_device
from ..distributed import SINGLE, World
from ..regions import ErrorProfile, LossRegionAnalyzer
from .generators import GENERATORS, GeneratorInputs, make_generator
from .plot import loss_map
from .pool import POLICIES, SyntheticPool, used_lengths

MODES = ("sage", "random", "inverse")
ROUNDS_PER_EPOCH = 3  # the default schedule of every training loop here (the accuracy study's choice)
PARTNERS = ("neighbours", "boundary", "same-label")
STATE_FORMAT = 1
EXAMPLES_PER_ROUND = 3  # decoded rows a round of real-token rows shows, so a person can judge them

VectorsOf = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
Label = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, Mapping[int, torch.Tensor]]"]


@dataclass
class SynthesisConfig:
    """Settings of the synthesizer (the driver's flags of the same names).

    ``mode``: ``sage`` (anchors from the top-``quantile`` loss regions, partners among their map
    neighbours), ``random`` (anchors uniform: the baseline) or ``inverse`` (partners through the
    map's approximate inverse). ``min_examples``: a round needs at least this many seen rows.

    ``profile_decay``: None keeps each row's running mean over all its visits; a value in (0, 1]
    lets old visits fade (see :class:`~sage_fast.regions.ErrorProfile`), so a round sees where the
    student is wrong now. ``partners``: ``neighbours`` draws each anchor's partner among its map
    neighbours; ``boundary`` prefers a map neighbour of another class (the class ``observe`` was
    given, e.g. the teacher's prediction), so the synthetic row lies between the classes, falling
    back to any neighbour where none differs; ``same-label`` prefers a map neighbour of the anchor's
    own class (give ``observe`` the gold labels), and a synthetic row whose two ends share a class
    carries that class as its gold label (``SyntheticRows.labels``; -1 where they differ), so the
    loss can hold it to the gold label as it does real rows, where the teacher's label on it may be
    wrong. Both modes (sage, random) use the same rule, so the random baseline differs from SAGE in
    the anchors alone.

    ``generator``: how a round's plan becomes rows (``sage_fast.synthesis.generators``), with every
    mode: ``interpolate`` (``lam_low``, ``lam_high``, ``noise_std``); ``substitute``, a variant of
    each anchor with ``round(substitute_share * n)`` of its ``n`` word pieces replaced by one of
    their ``substitute_top_k`` nearest tokens in the teacher's embedding table, after a span of
    ``substitute_span`` of its partner's pieces (0: none) took the place of as many of its own;
    ``boundary``, ``boundary_steps`` steps from each anchor toward more student-teacher
    disagreement, each moving no token further than ``boundary_step_size`` times the anchor's mean
    token-vector norm (it ignores partners, so it takes ``partners='neighbours'``).
    """
    mode: str = "sage"
    synthetic_per_round: int = 256
    pool_size: int = 1024
    pool_policy: str = "fifo"
    quantile: float = 0.7
    n_neighbors: int = 10
    lam_low: float = 0.3
    lam_high: float = 0.7
    noise_std: float = 0.0
    seed: int = 0
    device: str | torch.device = "cpu"
    min_examples: int = 8
    profile_decay: float | None = None
    partners: str = "neighbours"
    generator: str = "interpolate"
    substitute_share: float = 0.15
    substitute_top_k: int = 8
    substitute_span: float = 0.0
    boundary_steps: int = 3
    boundary_step_size: float = 0.05

    def __post_init__(self):
        _checks.choice("mode", self.mode, MODES)
        _checks.integer("synthetic_per_round", self.synthetic_per_round, minimum=1)
        _checks.integer("pool_size", self.pool_size, minimum=1)
        if self.pool_size < self.synthetic_per_round:
            raise ValueError(f"pool_size ({self.pool_size}) must be at least synthetic_per_round "
                             f"({self.synthetic_per_round}): otherwise each round would push out rows it has just made")
        _checks.choice("pool_policy", self.pool_policy, POLICIES)
        self.quantile = _checks.in_range("quantile", self.quantile, 0.0, 1.0, lo_open=True, hi_open=True)
        _checks.integer("n_neighbors", self.n_neighbors, minimum=2)
        self.lam_low = _checks.in_range("lam_low", self.lam_low, 0.0, 1.0)
        self.lam_high = _checks.in_range("lam_high", self.lam_high, 0.0, 1.0)
        if self.lam_low > self.lam_high:
            raise ValueError(f"lam_low ({self.lam_low}) must not exceed lam_high ({self.lam_high})")
        self.noise_std = _checks.in_range("noise_std", self.noise_std, 0.0, float("inf"), hi_open=True)
        _checks.integer("seed", self.seed, minimum=0)
        _checks.integer("min_examples", self.min_examples, minimum=5)  # UMAP's own minimum
        if self.profile_decay is not None:
            self.profile_decay = _checks.in_range("profile_decay", self.profile_decay, 0.0, 1.0, lo_open=True)
        _checks.choice("partners", self.partners, PARTNERS)
        if self.partners != "neighbours" and self.mode == "inverse":
            raise ValueError(f"partners={self.partners!r} picks among map neighbours; mode 'inverse' picks partners "
                             "through the map's inverse instead: use one or the other")
        _checks.choice("generator", self.generator, GENERATORS)
        self.substitute_share = _checks.in_range("substitute_share", self.substitute_share, 0.0, 1.0)
        _checks.integer("substitute_top_k", self.substitute_top_k, minimum=1)
        self.substitute_span = _checks.in_range("substitute_span", self.substitute_span, 0.0, 1.0)
        _checks.integer("boundary_steps", self.boundary_steps, minimum=1)
        self.boundary_step_size = _checks.in_range("boundary_step_size", self.boundary_step_size, 0.0, float("inf"),
                                                   lo_open=True, hi_open=True)
        if self.generator == "boundary" and self.partners != "neighbours":
            raise ValueError(f"partners={self.partners!r} chooses partners, and generator 'boundary' steps from the "
                             "anchor alone: use partners='neighbours' with it")
        self.device = resolve_device(str(self.device) if isinstance(self.device, torch.device) else self.device)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "device": str(self.device)}


@dataclass(frozen=True)
class ProfileSnapshot:
    """What a plan is made from: copies of the seen rows, so training may go on updating the profile."""
    ids: torch.Tensor          # [n] int64 example ids of the seen rows
    embeddings: torch.Tensor   # [n, d] float32 pooled student embeddings
    losses: torch.Tensor       # [n] float32 per-example losses
    round: int                 # the round this snapshot is for (1, 2, ...)
    generator_state: torch.Tensor  # the analysis generator's state before this round's draw
    classes: torch.Tensor | None = None  # [n] int64 class of each seen row (-1: never given)

    def state_dict(self) -> dict:
        """Host copies of the fields, for a checkpoint taken while the snapshot's round is in flight."""
        return {name: value.cpu() if isinstance(value, torch.Tensor) else value
                for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_state(cls, state: Mapping, device: torch.device | str) -> "ProfileSnapshot":
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a dict from ProfileSnapshot.state_dict(), got {type(state).__name__}")
        missing = sorted({"ids", "embeddings", "losses", "round", "generator_state"} - set(state))
        if missing:
            raise ValueError(f"state is missing {missing}: give a dict from ProfileSnapshot.state_dict()")
        # The generator state stays on the host (torch keeps every generator's state there).
        moved = {name: value.to(device) if isinstance(value, torch.Tensor) and name != "generator_state" else value
                 for name, value in state.items()}
        return cls(**moved)


@dataclass
class SynthesisPlan:
    """One round's triples, before any model runs. ``anchors`` and ``partners`` index ``ids`` (the
    analyzer's numbering); ``anchor_ids`` / ``partner_ids`` are example ids."""
    round: int
    ids: torch.Tensor
    anchors: torch.Tensor
    partners: torch.Tensor
    lam: torch.Tensor
    noise_seed: int
    analyzer: LossRegionAnalyzer
    threshold: float
    analysis_seconds: float
    generator_state: torch.Tensor  # the analysis generator's state after the draw
    step: int | None = None
    labels: torch.Tensor | None = None  # [M] int64 gold label of each row (-1: none); partners='same-label'

    @property
    def anchor_ids(self) -> torch.Tensor:
        return self.ids[self.anchors]

    @property
    def partner_ids(self) -> torch.Tensor:
        return self.ids[self.partners]

    @property
    def count(self) -> int:
        return int(self.anchors.shape[0])


@dataclass
class RoundRecord:
    """What one round did and what it cost (wall seconds; on CUDA each stage ends with a device
    synchronisation, once per round, so the times are the stages' own)."""
    round: int
    step: int | None
    examples: int              # rows the analysis saw
    synthetic: int             # rows made this round
    pool_size: int             # rows in the pool afterwards
    threshold: float           # region-score quantile above which anchors are drawn
    analysis_seconds: float    # kNN, UMAP, region scores, the draw
    synthesis_seconds: float   # gathering real vectors, interpolation, the pool
    labelling_seconds: float   # the caller's label()
    plot_seconds: float = 0.0
    png: str | None = None
    plot_error: str | None = None  # why there is no picture (matplotlib missing, say)
    # A round made beside training (``sage_fast.synthesis.background``): the step its snapshot was
    # taken at, and the seconds the training loop waited for it (the stage times above were spent
    # by the worker, beside training; ``wait_seconds`` and ``commit_seconds`` are what training paid).
    snapshot_step: int | None = None
    wait_seconds: float = 0.0
    commit_seconds: float = 0.0
    # A few rows of a generator that makes real tokens, decoded: "anchor -> variant (teacher ...)".
    decoded: list[str] = field(default_factory=list)

    def metrics(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SyntheticRows:
    """Synthetic rows for a batch: teacher-space vectors and mask, the teacher's logits and the
    hidden layers it was asked for (``{teacher layer: [n, L, d_t]}``, empty without alignment).
    ``width``: the most tokens any of these rows uses, known on the host (``sample`` sets it), so a
    step can trim padding without reading the mask back from the device. ``labels``: [n] int64 gold
    label of each row, -1 where it has none (every row but those of ``partners='same-label'``);
    None: none has one. ``tokens``: [n, L] int64 token ids when the rows are real text (the
    ``substitute`` generator's), so a student that does not read the teacher's vectors can read
    them; None otherwise."""
    vectors: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    width: int | None = None
    labels: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def loss_labels(self, ignore_index: int = -100) -> torch.Tensor:
        """Labels for the cross-entropy term: each row's gold label where it has one, ``ignore_index``
        elsewhere (those rows learn from the teacher's soft labels alone)."""
        if self.labels is None:
            return torch.full((len(self),), ignore_index, dtype=torch.int64, device=self.logits.device)
        return torch.where(self.labels >= 0, self.labels, torch.full_like(self.labels, ignore_index))


def partner_classes(partners: str, teacher_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """What a training loop gives ``observe`` as each real row's class for ``partners``: the
    teacher's prediction for ``boundary`` (the boundary the student learns is the teacher's), the
    gold label for ``same-label`` (the label the synthetic rows then carry), None for
    ``neighbours`` (no per-step argmax or scatter)."""
    _checks.choice("partners", partners, PARTNERS)
    if partners == "boundary":
        return teacher_logits.argmax(-1)
    if partners == "same-label":
        if labels is None:
            raise ValueError("partners='same-label' needs the gold labels of the training rows")
        return labels
    return None


@dataclass
class SynthesizedRound:
    """A plan's synthetic rows and their teacher labels, made but not yet in the pool (``synthesize``
    makes it, ``commit`` adds it), with what making them cost."""
    plan: SynthesisPlan
    rows: SyntheticRows
    lengths: torch.Tensor  # [M] used width of each row (``used_lengths(rows.mask)``), on the host
    synthesis_seconds: float
    labelling_seconds: float
    # the rows this rank labelled (every row under one process): ``rows.logits`` and ``rows.hidden``
    # hold only those until ``commit`` gathers the other ranks' shares
    labelled: slice = field(default_factory=lambda: slice(None))
    decoded: list[str] = field(default_factory=list)


def _synchronize(device: torch.device) -> None:
    # Stage times are only honest once the device has finished the stage's work; once per round.
    # Only the calling thread's stream: a round made beside training (on a side stream) must not
    # wait for the training step's kernels, nor they for it.
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def default_analysis_interval(steps_per_epoch: int) -> int:
    """Optimizer steps between analysis rounds when a loop is given none: ``ROUNDS_PER_EPOCH``
    rounds an epoch. Chosen on the accuracy study's validation numbers (docs/results.md): with one
    round at each epoch's end a one-epoch run got no synthetic row at all, while three rounds an
    epoch put SAGE above random anchors and KD after one epoch on 2,000 rows, and cost nothing after
    three."""
    return max(1, steps_per_epoch // ROUNDS_PER_EPOCH)


def make_analyzer(config: SynthesisConfig, n_points: int, random_state: int) -> LossRegionAnalyzer:
    """The analyzer for ``n_points`` seen rows: UMAP needs ``n_neighbors + 2`` points at least, so a
    large setting is capped to the data."""
    return LossRegionAnalyzer(
        n_neighbors=max(2, min(config.n_neighbors, n_points - 2)), quantile=config.quantile,
        mode="inverse" if config.mode == "inverse" else "interpolate",
        lam_range=(config.lam_low, config.lam_high), random_state=random_state, device=config.device)


def plan_round(snapshot: ProfileSnapshot, config: SynthesisConfig, count: int | None = None,
               step: int | None = None) -> SynthesisPlan:
    """The planning half of a round, from ``snapshot`` and ``config`` alone (no model, no shared
    state): fit the analyzer, draw ``count`` (default ``synthetic_per_round``) triples."""
    count = config.synthetic_per_round if count is None else _checks.integer("count", count, minimum=1)
    started = time.perf_counter()
    round_seed = config.seed * 1000 + snapshot.round
    analyzer = make_analyzer(config, int(snapshot.ids.shape[0]), round_seed)
    analyzer.fit(snapshot.embeddings, snapshot.losses)
    generator = torch.Generator(device=config.device)
    generator.set_state(snapshot.generator_state)
    draw = analyzer.sample_uniform_pairs if config.mode == "random" else analyzer.sample_pairs
    anchors, partners, lam = draw(count, generator)
    labels = None
    if config.partners != "neighbours" and snapshot.classes is not None:
        same = config.partners == "same-label"
        partners = class_partners(analyzer.map_knn_indices_, snapshot.classes, anchors, partners, generator,
                                  same=same)
        if same:
            labels = row_labels(snapshot.classes, anchors, partners)
    threshold = float(analyzer.threshold_)  # a host read, once per round
    _synchronize(config.device)
    return SynthesisPlan(round=snapshot.round, ids=snapshot.ids, anchors=anchors, partners=partners, lam=lam,
                         noise_seed=round_seed, analyzer=analyzer, threshold=threshold,
                         analysis_seconds=time.perf_counter() - started, generator_state=generator.get_state(),
                         step=step, labels=labels)


def class_partners(map_neighbours: torch.Tensor, classes: torch.Tensor, anchors: torch.Tensor,
                   partners: torch.Tensor, generator: torch.Generator, *, same: bool = False) -> torch.Tensor:
    """For each anchor, a map neighbour of another class (``same=True``: of the anchor's own class)
    drawn uniformly among those that exist (``map_neighbours`` [n, k] rows of the map's kNN graph,
    ``classes`` [n]); the given partner where no neighbour qualifies or the classes are unknown (-1)."""
    classes = classes.to(map_neighbours.device)
    neighbours = map_neighbours[anchors]                       # [m, k]
    anchor_class = classes[anchors].unsqueeze(1)
    wanted = (classes[neighbours] == anchor_class) if same else (classes[neighbours] != anchor_class)
    wanted = wanted & (classes[neighbours] >= 0) & (anchor_class >= 0)
    score = torch.rand(neighbours.shape, generator=generator, device=neighbours.device)
    pick = torch.where(wanted, score, torch.full_like(score, -1.0)).argmax(dim=1, keepdim=True)
    return torch.where(wanted.any(dim=1), neighbours.gather(1, pick).squeeze(1), partners)


def row_labels(classes: torch.Tensor, anchors: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """The gold label of each synthetic row: the class its anchor and partner share, -1 where they
    differ or either is unknown (a mix of two classes has no gold label)."""
    classes = classes.to(anchors.device)
    a, b = classes[anchors], classes[partners]
    return torch.where((a == b) & (a >= 0), a, torch.full_like(a, -1))


class SAGESynthesizer:
    """The error profile, the analysis rounds and the synthetic pool of one training run.

    Args:
        config: a :class:`SynthesisConfig`.
        num_examples: training rows; example ids lie in ``[0, num_examples)``.
        embedding_dim: width of the pooled student embeddings given to ``observe``.
    """

    def __init__(self, config: SynthesisConfig, *, num_examples: int, embedding_dim: int,
                 world: World = SINGLE, inputs: GeneratorInputs | None = None):
        if not isinstance(config, SynthesisConfig):
            raise ValueError(f"config must be a SynthesisConfig, got {type(config).__name__}")
        inputs = GeneratorInputs() if inputs is None else inputs
        if not isinstance(inputs, GeneratorInputs):
            raise ValueError(f"inputs must be a GeneratorInputs, got {type(inputs).__name__}")
        generator = make_generator(config)
        generator.check(inputs)  # a generator that lacks what it reads stops here, before any work
        _checks.integer("num_examples", num_examples, minimum=1)
        _checks.integer("embedding_dim", embedding_dim, minimum=1)
        if not isinstance(world, World):
            raise ValueError(f"world must be a sage_fast.distributed.World, got {type(world).__name__}")
        self.config = config
        self.world = world
        self.device = config.device
        self.inputs, self.generator = inputs, generator
        self.profile = ErrorProfile(num_examples, embedding_dim, self.device, decay=config.profile_decay)
        self.classes = torch.full((num_examples,), -1, dtype=torch.int64, device=self.device)
        self.pool = SyntheticPool(config.pool_size, config.pool_policy)
        self.pool_generator = torch.Generator().manual_seed(config.seed + 1)
        self.analysis_generator = torch.Generator(device=self.device).manual_seed(config.seed + 2)
        self.rounds = 0  # rounds built so far

    def __repr__(self) -> str:
        return (f"SAGESynthesizer(mode={self.config.mode!r}, rounds={self.rounds}, pool={len(self.pool)}/"
                f"{self.pool.capacity}, examples={self.profile.num_examples}, device={str(self.device)!r})")

    # ------------------------------------------------------------------ the profile
    def observe(self, ids: torch.Tensor, per_example_loss: torch.Tensor, embeddings: torch.Tensor,
                classes: torch.Tensor | None = None, *, sizes: list[int] | None = None) -> None:
        """Fold one step's real rows into the profile: ``ids`` [B] example ids, ``per_example_loss``
        [B] and ``embeddings`` [B, embedding_dim] (detached here), on the synthesizer's device.
        ``classes`` [B] (optional): each row's class, for ``partners='boundary'``; the teacher's
        prediction is the natural choice, since the synthetic rows carry the teacher's labels.

        Under several processes every rank calls this each step with its own rows (a collective):
        the rows of all ranks are gathered and folded in on every rank. ``sizes``: each rank's row
        count this step, when the caller knows them on the host (it usually does: they follow from
        the global batch); otherwise they are gathered first over a CPU group (``World.row_counts``:
        the host waits for the other ranks, not for the device)."""
        if self.world.distributed:
            if sizes is None:
                sizes = self.world.row_counts(int(ids.shape[0]))
            ids, per_example_loss, embeddings, classes = self._gather_rows(ids, per_example_loss, embeddings, classes,
                                                                          sizes)
        self._fold(ids, per_example_loss, embeddings, classes)

    def _gather_rows(self, ids, losses, embeddings, classes, sizes):
        """Every rank's rows in one collective: the int64 columns travel as their bits (two float32
        words each, copied, never computed on) beside the float32 ones."""
        def bits(values):  # int64 [B] -> float32 [B, 2], the same bytes
            return values.detach().to(self.device, torch.int64).contiguous().reshape(-1, 1).view(torch.float32)

        columns = [bits(ids), losses.detach().float().to(self.device).reshape(-1, 1),
                   embeddings.detach().float().to(self.device)]
        if classes is not None:
            columns.append(bits(classes))
        gathered = self.world.all_gather_rows(torch.cat(columns, dim=1), sizes)
        d = embeddings.shape[1]
        ids = gathered[:, 0:2].contiguous().view(torch.int64).reshape(-1)
        losses = gathered[:, 2]
        embeddings = gathered[:, 3:3 + d]
        if classes is not None:
            classes = gathered[:, 3 + d:5 + d].contiguous().view(torch.int64).reshape(-1)
        return ids, losses, embeddings, classes

    def _fold(self, ids, per_example_loss, embeddings, classes) -> None:
        self.profile.update(ids, per_example_loss.detach().float(), embeddings.detach())
        if classes is not None:
            _checks.tensor("classes", classes, ndim=1)
            if classes.shape[0] != ids.shape[0]:
                raise ValueError(f"classes must have one value per id: got {classes.shape[0]} for {ids.shape[0]} ids")
            self.classes[ids.to(self.device, torch.int64)] = classes.detach().to(self.device, torch.int64)

    def refreshing(self):
        """Inside the block, ``observe`` overwrites: each row's statistics restart at its first
        observation in the block (a refresh by one no-grad pass)."""
        return self.profile.refreshing()

    def refresh(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Recompute the profile from ``(ids, per_example_loss, embeddings)`` batches. Under several
        processes each rank passes every row (nothing is gathered)."""
        with self.refreshing():
            for ids, losses, embeddings in batches:
                self._fold(ids, losses, embeddings, None)

    @property
    def seen(self) -> int:
        """Rows observed at least once (a host read)."""
        return int(self.profile.seen.sum())

    # ------------------------------------------------------------------ a round
    def snapshot(self) -> ProfileSnapshot | None:
        """Copies of the seen rows for the next round's plan, or None below ``min_examples``."""
        seen = self.profile.seen.nonzero().squeeze(1)
        if seen.numel() < self.config.min_examples:
            return None
        return ProfileSnapshot(ids=seen, embeddings=self.profile.embedding[seen], losses=self.profile.loss[seen],
                               round=self.rounds + 1, generator_state=self.analysis_generator.get_state(),
                               classes=self.classes[seen])

    def plan(self, *, count: int | None = None, step: int | None = None) -> SynthesisPlan | None:
        """The next round's plan (``plan_round`` on a fresh ``snapshot``), or None when too few rows
        have been seen. Does not change the synthesizer: ``build`` commits the plan."""
        snapshot = self.snapshot()
        return None if snapshot is None else plan_round(snapshot, self.config, count, step)

    def _check_next(self, plan) -> None:
        if not isinstance(plan, SynthesisPlan):
            raise ValueError(f"plan must be a SynthesisPlan, got {type(plan).__name__}")
        if plan.round != self.rounds + 1:
            raise ValueError(f"plan is for round {plan.round} but the synthesizer is at round {self.rounds}: build "
                             "each plan once, in order, and plan the next round after building this one")

    @torch.no_grad()
    def synthesize(self, plan: SynthesisPlan, vectors_of: VectorsOf, label: Label, *,
                   student: torch.nn.Module | None = None) -> "SynthesizedRound":
        """Make the plan's rows with the configured generator and label them, without touching the
        pool or any other state (so a worker may run it beside training): ``commit`` adds the result.
        ``student``: the module a generator that reads the student (``generator.reads_student``)
        reads instead of the inputs' own, a frozen copy when a worker runs this beside training."""
        if not isinstance(plan, SynthesisPlan):
            raise ValueError(f"plan must be a SynthesisPlan, got {type(plan).__name__}")
        started = time.perf_counter()
        m = plan.count
        inputs = self.inputs if student is None else dataclasses.replace(self.inputs, student=student)
        made = self.generator.generate(plan, vectors_of, label, inputs)
        out, out_mask = made.vectors, made.mask
        _synchronize(self.device)
        generated = time.perf_counter()
        share = self.world.share(m)  # every row under one process
        logits, hidden = label(out[share], out_mask[share])
        _synchronize(self.device)
        labelled = time.perf_counter()
        # The rows' widths on the host, read here (beside training, when a worker runs this) rather
        # than by the pool on the training thread.
        lengths = used_lengths(out_mask).cpu()
        labels = None if plan.labels is None else plan.labels.to(out.device)
        rows = SyntheticRows(out, out_mask, logits, dict(hidden or {}), labels=labels, tokens=made.tokens)
        return SynthesizedRound(plan=plan, rows=rows,
                                lengths=lengths, synthesis_seconds=(generated - started)
                                + (time.perf_counter() - labelled), labelling_seconds=labelled - generated,
                                labelled=share, decoded=self._decoded(made, logits, share))

    def _decoded(self, made, logits: torch.Tensor, share: slice) -> list[str]:
        """A few of this rank's rows decoded, ``anchor -> variant (teacher: class c, p)``, when they are
        real tokens and the inputs can decode them; once per round, beside training when it can be."""
        decode = self.inputs.decode
        if made.tokens is None or decode is None or logits.shape[0] == 0:
            return []
        start = share.start or 0
        probabilities = torch.softmax(logits[:EXAMPLES_PER_ROUND].float(), dim=-1).cpu()
        lines = []
        for j in range(probabilities.shape[0]):
            row, keep = start + j, made.mask[start + j].cpu() != 0
            p, c = probabilities[j].max(dim=0)
            lines.append(f"{decode(made.source_tokens[row].cpu()[keep])!r} -> {decode(made.tokens[row].cpu()[keep])!r} "
                         f"(teacher: class {int(c)}, p {float(p):.2f})")
        return lines

    @torch.no_grad()
    def commit(self, made: "SynthesizedRound") -> RoundRecord:
        """Add a synthesized round to the pool and advance the synthesizer to its round."""
        if not isinstance(made, SynthesizedRound):
            raise ValueError(f"made must be a SynthesizedRound from synthesize(), got {type(made).__name__}")
        plan = made.plan
        self._check_next(plan)
        started = time.perf_counter()
        rows = self._gather_labels(made)
        self.pool.add(rows.vectors, rows.mask, rows.logits, rows.hidden, generator=self.pool_generator,
                      lengths=made.lengths, labels=rows.labels, tokens=rows.tokens)
        _synchronize(self.device)
        self.rounds = plan.round
        self.analysis_generator.set_state(plan.generator_state)
        return RoundRecord(
            round=plan.round, step=plan.step, examples=int(plan.ids.shape[0]), synthetic=plan.count,
            pool_size=len(self.pool), threshold=plan.threshold, analysis_seconds=plan.analysis_seconds,
            synthesis_seconds=made.synthesis_seconds + (time.perf_counter() - started),
            labelling_seconds=made.labelling_seconds, decoded=list(made.decoded))

    def _gather_labels(self, made: "SynthesizedRound") -> SyntheticRows:
        """The round's rows with every rank's labels (this rank labelled ``made.labelled``). Runs
        on the training thread, in ``commit``: collectives are issued in one order on every rank."""
        rows, m = made.rows, made.plan.count
        if not self.world.distributed:
            return rows
        if made.labelled != self.world.share(m):
            raise ValueError(f"this round was labelled for share {made.labelled} but this rank's share is "
                             f"{self.world.share(m)}: synthesize and commit under the same world")
        self._check_same_plan(made.plan)
        sizes = self.world.share_sizes(m)
        logits = self.world.all_gather_rows(rows.logits.contiguous(), sizes)
        hidden = {k: self.world.all_gather_rows(v.contiguous(), sizes) for k, v in sorted(rows.hidden.items())}
        return SyntheticRows(rows.vectors, rows.mask, logits, hidden, labels=rows.labels, tokens=rows.tokens)

    def _check_same_plan(self, plan: SynthesisPlan) -> None:
        """Every rank made its plan itself, from the same profile and seed; a plan that differs
        (an analysis that is not deterministic on some device) would give each rank other rows
        under the same labels, so it stops the run instead. One host read per round."""
        digest = torch.stack([plan.anchor_ids.sum(), plan.partner_ids.sum(),
                              (plan.anchor_ids * torch.arange(1, plan.count + 1, device=plan.ids.device)).sum(),
                              (plan.lam.double() * 2.0 ** 20).round().sum().to(torch.int64)]).to(torch.int64)
        digests = self.world.all_gather_rows(digest.unsqueeze(0).to(self.device), [1] * self.world.size)
        if not bool((digests == digests[0]).all()):
            raise RuntimeError(f"round {plan.round}: the ranks planned different synthetic rows from the same "
                               "profile and seed, so the analysis is not deterministic on this device (GPU UMAP, say); "
                               "train this mode with one process, or with --device cpu")

    def build(self, plan: SynthesisPlan, vectors_of: VectorsOf, label: Label) -> RoundRecord:
        """The building half: make the plan's rows, label them, add them to the pool
        (``synthesize`` then ``commit``)."""
        self._check_next(plan)
        return self.commit(self.synthesize(plan, vectors_of, label))

    def round(self, vectors_of: VectorsOf, label: Label, *, step: int | None = None,
              plot_path: str | Path | Callable[[int], str | Path] | None = None) -> RoundRecord | None:
        """One analysis round, ``plan`` then ``build``; None when too few rows have been seen.

        ``plot_path``: where to write the loss map (PNG), or a callable from the round number to
        that path. Without matplotlib the round goes on and the record says why there is no
        picture."""
        plan = self.plan(step=step)
        if plan is None:
            return None
        record = self.build(plan, vectors_of, label)
        record.png, record.plot_error, record.plot_seconds = self.plot_round(plan, plot_path)
        return record

    def plot_round(self, plan: SynthesisPlan, plot_path: str | Path | Callable[[int], str | Path] | None):
        """``(png, why there is none, seconds)`` of drawing ``plan``'s loss map at ``plot_path`` (a
        path, or a callable from the round number to one; None: no picture). Without matplotlib the
        round goes on and the second item says why there is no picture."""
        if plot_path is None:
            return None, None, 0.0
        started = time.perf_counter()
        png = error = None
        try:
            png = str(self.plot(plan, plot_path(plan.round) if callable(plot_path) else plot_path))
        except ImportError as err:  # matplotlib is optional: the run goes on without the picture
            error = str(err)
        return png, error, time.perf_counter() - started

    def plot(self, plan: SynthesisPlan, path: str | Path, title: str | None = None) -> Path:
        """The loss map of ``plan``'s analysis with its anchors and synthetic rows, as a PNG."""
        if title is None:
            at = "" if plan.step is None else f", step {plan.step}"
            title = (f"{self.config.mode}: round {plan.round}{at}, {int(plan.ids.shape[0])} examples, "
                     f"{plan.count} synthetic")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Only interpolated rows lie between anchor and partner; the others are variants of the anchor.
        lam = plan.lam if self.generator.name == "interpolate" else torch.ones_like(plan.lam)
        return loss_map(plan.analyzer, path, synthetic=(plan.anchors, plan.partners, lam), anchors=plan.anchors,
                        title=title)

    # ------------------------------------------------------------------ the pool
    def sample(self, n: int, generator: torch.Generator | None = None, *, parts: int | None = None):
        """Up to ``n`` pool rows for the next batch, drawn without replacement with ``generator``
        (a CPU generator; default: the synthesizer's own), or None when the pool is empty.

        Under several processes every rank draws the same ``n`` rows (same generator, same pool)
        and gets its part: of ``world.size`` parts, rank ``r`` takes rows ``r, r + size, ...``.
        ``parts=K`` (micro-batches a step: gradient accumulation) splits the draw in ``size * K``
        parts and returns this rank's K of them as a list (an empty part is None), so K
        micro-batches on one process see the rows K processes would."""
        index = self.pool.draw(n, self.pool_generator if generator is None else generator)
        if index is None:
            return None
        if parts is None and not self.world.distributed:
            return self._rows(index)
        k = 1 if parts is None else _checks.integer("parts", parts, minimum=1)
        total = self.world.size * k
        pieces = [index[j::total] for j in range(self.world.rank * k, (self.world.rank + 1) * k)]
        rows = [self._rows(piece) if piece.numel() else None for piece in pieces]
        return rows if parts is not None else rows[0]

    def _rows(self, index: torch.Tensor) -> SyntheticRows:
        vectors, mask, logits, hidden, labels = self.pool.take(index)
        return SyntheticRows(vectors, mask, logits, hidden, width=self.pool.width_of(index), labels=labels,
                             tokens=self.pool.tokens_at(index))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "config": self.config.to_dict(), "rounds": self.rounds,
                "profile": self.profile.state_dict(), "classes": self.classes.clone(), "pool": self.pool.state_dict(),
                "pool_generator": self.pool_generator.get_state(),
                "analysis_generator": self.analysis_generator.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = sorted({"rounds", "profile", "classes", "pool", "pool_generator", "analysis_generator"} - set(state))
        if missing:
            raise ValueError(f"state is missing {missing}: give a dict from SAGESynthesizer.state_dict()")
        if state.get("format", STATE_FORMAT) != STATE_FORMAT:
            raise ValueError(f"state has format {state['format']}, this version reads format {STATE_FORMAT}")
        # The seed and the mode decide every later draw: continuing under others would not be the same run.
        saved = state.get("config") or {}
        changed = [f"{key} {saved[key]!r} (this one: {getattr(self.config, key)!r})" for key in ("mode", "seed")
                   if key in saved and saved[key] != getattr(self.config, key)]
        if changed:
            raise ValueError(f"state was saved with {', '.join(changed)}; build the synthesizer with the same settings")
        self.profile.load_state_dict(state["profile"])
        self.classes.copy_(_checks.tensor("state['classes']", state["classes"], ndim=1))
        self.pool.load_state_dict(state["pool"], device=self.device)
        self.pool_generator.set_state(state["pool_generator"])
        self.analysis_generator.set_state(state["analysis_generator"])
        self.rounds = _checks.integer("rounds", state["rounds"], minimum=0)


__all__ = ["MODES", "PARTNERS", "ProfileSnapshot", "RoundRecord", "SAGESynthesizer", "SynthesisConfig", "SynthesisPlan",
           "SynthesizedRound", "SyntheticRows", "class_partners", "default_analysis_interval", "make_analyzer",
           "partner_classes", "plan_round", "row_labels"]
