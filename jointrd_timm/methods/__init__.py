"""Distillation methods in plain PyTorch (no torchdistill, no accelerate here)."""
from .jointrd import JointRD, JointRDConfig, jointrd_loss
from .schedules import eta_schedule
from .adversarial import AdversarialPortableStudent, ConditionalAdversarialKD, LogitDiscriminator, FeatureDiscriminator
