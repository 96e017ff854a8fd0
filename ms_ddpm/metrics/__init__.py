"""Evaluation: distances between feature statistics (FID, KID), feature networks, and likelihood in bits per
dimension (variational bound and probability-flow ODE)."""
from .evaluate import evaluate, real_floor
from .features import MNISTClassifier, load_feature_extractor, save_feature_extractor
from .frechet import feature_statistics, frechet_distance, kernel_distance
from .inception import FIDInceptionV3
from .likelihood import (calc_bpd_loop, discretized_gaussian_log_likelihood, normal_kl, ode_bpd, prior_bpd,
                         vb_terms_bpd)

__all__ = ["feature_statistics", "frechet_distance", "kernel_distance", "calc_bpd_loop",
           "discretized_gaussian_log_likelihood", "normal_kl", "ode_bpd", "prior_bpd", "vb_terms_bpd",
           "MNISTClassifier", "FIDInceptionV3", "load_feature_extractor", "save_feature_extractor", "evaluate",
           "real_floor"]
