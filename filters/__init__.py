"""Filters: separate grain from chaff (rule filters, exact and near dedup, diversity selection, thresholds)."""

from thresher.filters.decontaminate import Decontaminate
from thresher.filters.diversity import DiversitySelect
from thresher.filters.exact_dedup import ExactDedup
from thresher.filters.kmeans_sample import KMeansSample
from thresher.filters.mig import MIGSelect
from thresher.filters.near_dedup import NearDedup, rethreshold
from thresher.filters.rouge import RougeFilter, RougePool, rouge_tokens
from thresher.filters.rules import LengthFilter, RegexFilter
from thresher.filters.select import LongestSelect, RandomSelect, Threshold, TopK, TopPercent

__all__ = ["ExactDedup", "LengthFilter", "RegexFilter", "RougeFilter", "RougePool", "rouge_tokens"]
__all__ += ["Decontaminate", "LongestSelect", "MIGSelect", "RandomSelect", "Threshold", "TopK", "TopPercent"]
__all__ += ["DiversitySelect", "KMeansSample", "NearDedup", "rethreshold"]
