"""A-contrario (NFA) segmentation of U-Flow latents: tree and block methods."""

from uflow_exp.nfa.block import block_nfa
from uflow_exp.nfa.tree import log_number_of_tests, tree_nfa

__all__ = ["block_nfa", "log_number_of_tests", "tree_nfa"]
