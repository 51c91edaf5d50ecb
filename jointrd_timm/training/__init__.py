"""Training: Hugging Face datasets loading, safetensors checkpoints, the accelerate runner."""
