"""Generators: steps that make instruction rows (Self-Instruct, Evol-Instruct, Responder)."""

from thresher.generators.evol_instruct import EvolInstruct
from thresher.generators.responder import Respond, row_messages
from thresher.generators.self_instruct import SelfInstruct

__all__ = ["EvolInstruct", "Respond", "SelfInstruct", "row_messages"]
