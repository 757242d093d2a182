"""Judging a student: feature-space figures against data or against its teacher, diversity
across seeds and the collapse alarm. Everything here runs off the training graph, on features
a caller computed (Inception, CLIP or a task's own classifier), in float64.
"""

from fastgen.eval.bootstrap import paired_bootstrap
from fastgen.eval.collapse import CollapseAlarm, CollapseConfig, degenerate_images
from fastgen.eval.diversity import diversity_ratio, mean_pairwise_distance, vendi_score
from fastgen.eval.frechet import frechet_distance, gaussian_stats, stats_frechet_distance
from fastgen.eval.precision_recall import knn_precision_recall

__all__ = [
    # distances between feature sets
    "frechet_distance",
    "gaussian_stats",
    "stats_frechet_distance",
    "knn_precision_recall",
    # diversity across seeds
    "mean_pairwise_distance",
    "vendi_score",
    "diversity_ratio",
    # how sure a figure is
    "paired_bootstrap",
    # the collapse alarm
    "CollapseConfig",
    "CollapseAlarm",
    "degenerate_images",
]
