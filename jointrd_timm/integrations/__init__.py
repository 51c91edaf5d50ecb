"""Glue to outside libraries: torchdistill registries and the Hugging Face Hub. Kept thin."""
