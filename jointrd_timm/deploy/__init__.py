"""Deployment: folding, export, activation memory, latency, exact shortcut removal (RM)."""
from .exact import ExactConversionError, ExactPlainBlock, exact_conversion_report, exact_plain
