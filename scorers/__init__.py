"""Scorers: steps that judge rows (LLM judge, IFD, DEITA, InsTag) and cheap text statistics."""

from thresher.scorers.judge import LLMJudge
from thresher.scorers.text_stats import SetValue, TextStats

__all__ = ["LLMJudge", "SetValue", "TextStats"]
