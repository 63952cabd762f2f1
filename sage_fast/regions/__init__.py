"""Loss-region analysis: where the student does worst, and where to synthesise examples."""
from .profile import ErrorProfile, pooled_embedding

__all__: list[str] = ["ErrorProfile", "pooled_embedding"]
