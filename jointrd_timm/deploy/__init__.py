"""Deployment: folding, export, activation memory, latency."""
