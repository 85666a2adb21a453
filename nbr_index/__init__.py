"""The neighbourhood index of Anchor Neighbourhood Discovery (Huang et al., ICML 2019).

Computes, in one blocked pass over the memory bank's N x N similarities, every sample's k nearest
neighbours (Eq 1) and its softmax entropy (Eq 5); selects the curriculum's anchors (Eq 6); and
publishes them to the store as ``neighbourhoods/round-r``. Public API::

    from nbr_index import knn_entropy, KnnEntropy, select_anchors, neighbourhood_consistency,
                          rebuild, RebuildResult, ProcessGroupShard
"""

from .backends import BACKENDS, KnnEntropy, knn_entropy
from .curriculum import anchor_count, pair_consistency, neighbourhood_consistency, select_anchors
from .errors import (BackendUnavailableError, FeaturesNotReadyError, InvalidFeaturesError, InvalidParameterError,
                     NbrIndexError, RebuildCancelled)
from .rebuild import RebuildResult, rebuild
from .selection import SELECTION_CHOICES, SELECTIONS, class_nearest, mutual_nearest, stable_nearest
from .shard import ProcessGroupShard

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "FeaturesNotReadyError",
    "InvalidFeaturesError",
    "InvalidParameterError",
    "KnnEntropy",
    "NbrIndexError",
    "RebuildCancelled",
    "ProcessGroupShard",
    "RebuildResult",
    "SELECTIONS",
    "SELECTION_CHOICES",
    "anchor_count",
    "class_nearest",
    "knn_entropy",
    "mutual_nearest",
    "pair_consistency",
    "neighbourhood_consistency",
    "rebuild",
    "select_anchors",
    "stable_nearest",
]
