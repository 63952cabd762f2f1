"""Synthesis: SAGE's augmentation as a component any training loop can drive. It observes
per-example losses and embeddings, runs analysis rounds (``sage_fast.regions``), interpolates with
the fused op (``sage_fast.ops``), has the caller's teacher label the results, and serves synthetic
rows from a bounded pool. The driver (``sage_fast.train``) and the ``transformers`` integration
(``sage_fast.integrations``) both build on it; it imports neither."""
from .pool import POLICIES, SyntheticPool, pad_tokens
from .synthesizer import (MODES, ProfileSnapshot, RoundRecord, SAGESynthesizer, SynthesisConfig, SynthesisPlan,
                          SyntheticRows, make_analyzer, plan_round)

__all__ = ["MODES", "POLICIES", "ProfileSnapshot", "RoundRecord", "SAGESynthesizer", "SynthesisConfig",
           "SynthesisPlan", "SyntheticPool", "SyntheticRows", "make_analyzer", "pad_tokens", "plan_round"]
