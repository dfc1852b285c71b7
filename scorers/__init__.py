"""Scorers: steps that judge rows (LLM judge, IFD, DEITA, InsTag) and cheap text statistics."""

from thresher.scorers.deita import DeitaScorer
from thresher.scorers.ifd import IFDScorer
from thresher.scorers.judge import LLMJudge
from thresher.scorers.perplexity import Perplexity
from thresher.scorers.reward import RewardScorer
from thresher.scorers.tagger import Tagger
from thresher.scorers.text_stats import SetValue, TextStats

__all__ = ["DeitaScorer", "IFDScorer", "LLMJudge", "Perplexity", "RewardScorer", "SetValue", "Tagger", "TextStats"]
