"""Synthesis: SAGE's augmentation as a component any training loop can drive. It observes
per-example losses and embeddings, runs analysis rounds (``sage_fast.regions``), interpolates with
the fused op (``sage_fast.ops``), has the caller's teacher label the results, and serves synthetic
rows from a bounded pool. Rounds run inline or beside training (``BackgroundRounds``). The driver
(``sage_fast.train``) and the ``transformers`` integration (``sage_fast.integrations``) both build
on it; it imports neither."""
from .pool import POLICIES, SyntheticPool, pad_tokens, used_lengths
from .synthesizer import (MODES, ProfileSnapshot, RoundRecord, SAGESynthesizer, SynthesisConfig, SynthesisPlan,
                          SynthesizedRound, SyntheticRows, make_analyzer, plan_round)
from .background import BackgroundRounds, PendingRound

__all__ = ["BackgroundRounds", "MODES", "POLICIES", "PendingRound", "ProfileSnapshot", "RoundRecord",
           "SAGESynthesizer", "SynthesisConfig", "SynthesisPlan", "SynthesizedRound", "SyntheticPool", "SyntheticRows",
           "make_analyzer", "pad_tokens", "plan_round", "used_lengths"]
