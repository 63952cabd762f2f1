"""Synthesis: SAGE's augmentation as a component any training loop can drive. It observes
per-example losses and embeddings, runs analysis rounds (``sage_fast.regions``), makes rows with a
generator (``generators``: interpolation with the fused op of ``sage_fast.ops``, word-piece
substitution, boundary steps), has the caller's teacher label the results, and serves synthetic
rows from a bounded pool. ``SynthesisSession`` drives it on a round schedule, inline or beside
training (``BackgroundRounds``): the driver (``sage_fast.train``) and the ``transformers``
integration (``sage_fast.integrations``) are both adapters around one session; it imports neither."""
from .generators import GENERATORS, GeneratorInputs
from .pool import POLICIES, SyntheticPool
from .synthesizer import (MODES, PARTNERS, ProfileSnapshot, RoundRecord, SAGESynthesizer, SynthesisConfig,
                          SynthesisPlan, SynthesizedRound, SyntheticRows, default_analysis_interval, make_analyzer,
                          partner_classes, plan_round)
from .background import BackgroundRounds
from .session import (PROFILE_SIGNALS, Batch, RoundSchedule, SessionSettings, SynthesisSession, label_in_chunks, mix,
                      profile_signal)

__all__ = ["BackgroundRounds", "Batch", "GENERATORS", "GeneratorInputs", "MODES", "PARTNERS", "POLICIES",
           "PROFILE_SIGNALS", "ProfileSnapshot", "RoundRecord", "RoundSchedule", "SAGESynthesizer", "SessionSettings",
           "SynthesisConfig", "SynthesisPlan", "SynthesisSession", "SynthesizedRound", "SyntheticPool", "SyntheticRows",
           "default_analysis_interval", "label_in_chunks", "make_analyzer", "mix", "partner_classes", "plan_round",
           "profile_signal"]
