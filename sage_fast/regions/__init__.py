"""Loss-region analysis: where the student does worst, and where to synthesise examples."""
from .profile import ErrorProfile, pooled_embedding
from .knn import describe_backends, knn_graph
from .analyzer import LossRegionAnalyzer, NotFittedError, use_compilation_cache, warm_up, warm_up_in_background

__all__: list[str] = ["ErrorProfile", "pooled_embedding", "knn_graph", "describe_backends", "LossRegionAnalyzer",
                      "NotFittedError", "use_compilation_cache", "warm_up", "warm_up_in_background"]
