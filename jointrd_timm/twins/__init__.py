"""Shortcut-free twins of timm models: rules per family, derivation, Dirac parametrisation, verification."""
from .derive import NotResidualError, PlainReport, UnsupportedBlockError, make_plain
from .rules import ShortcutRule, get_rule, register_rule, rules, swap_rule, switch_rule
from .verify import count_shortcut_additions, find_unhandled_residual_blocks, shortcut_additions
from .graph_rule import UnfaithfulTraceError, check_graph_rule, register_graph_rule
