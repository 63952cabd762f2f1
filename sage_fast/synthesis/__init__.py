"""Synthesis: SAGE's augmentation as a component any training loop can drive. It observes
per-example losses and embeddings, runs analysis rounds (``sage_fast.regions``), makes rows with a
generator (``generators``: interpolation with the fused op of ``sage_fast.ops``, word-piece
substitution, boundary steps), has the caller's teacher label the results, and serves synthetic
rows from a bounded pool. Rounds run inline or beside training (``BackgroundRounds``). The driver
(``sage_fast.train``) and the ``transformers`` integration (``sage_fast.integrations``) both build
on it; it imports neither."""
from .generators import GENERATORS, GeneratorInputs
from .pool import POLICIES, SyntheticPool, pad_tokens, used_lengths
from .synthesizer import (MODES, PARTNERS, ProfileSnapshot, RoundRecord, SAGESynthesizer, SynthesisConfig,
                          SynthesisPlan, SynthesizedRound, SyntheticRows, default_analysis_interval, make_analyzer,
                          partner_classes, plan_round)
from .background import BackgroundRounds, PendingRound

__all__ = ["BackgroundRounds", "GENERATORS", "GeneratorInputs", "MODES", "PARTNERS", "POLICIES", "PendingRound",
           "ProfileSnapshot", "RoundRecord", "SAGESynthesizer", "SynthesisConfig", "SynthesisPlan", "SynthesizedRound",
           "SyntheticPool", "SyntheticRows", "default_analysis_interval", "make_analyzer", "pad_tokens", "partner_classes",
           "plan_round", "used_lengths"]
