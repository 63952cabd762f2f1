"""The generators of a round's build step: each turns a plan (anchors, partners, mixing weights) into
synthetic rows, which the teacher then labels. ``interpolate`` mixes an anchor and its partner
(the fused op), ``substitute`` replaces a share of an anchor's word pieces by their nearest
neighbours in the teacher's embedding table (real token ids), ``boundary`` takes bounded steps from
an anchor toward the student's disagreement with the teacher. Each works with every anchor placement
(``sage``, ``random``, ``inverse``)."""
from .base import GENERATORS, FrozenStudent, GeneratedRows, Generator, GeneratorInputs
from .boundary import Boundary, disagreement
from .interpolation import Interpolation
from .substitution import Substitution, nearest_tokens, replaceable_tokens

_BY_NAME = {cls.name: cls for cls in (Interpolation, Substitution, Boundary)}


def make_generator(config) -> Generator:
    """The generator ``config.generator`` names, with ``config``'s settings."""
    return _BY_NAME[config.generator](config)


__all__ = ["Boundary", "FrozenStudent", "GENERATORS", "GeneratedRows", "Generator", "GeneratorInputs", "Interpolation",
           "Substitution", "disagreement", "make_generator", "nearest_tokens", "replaceable_tokens"]
