"""The catalogue of published twins, shipped inside the package as ``jointrd_timm.registry`` (data, no code):
one ``<architecture>.<tag>.json`` entry per published model, its weights under ``weights/<name>/``."""
