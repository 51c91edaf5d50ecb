"""Distillation methods in plain PyTorch (no torchdistill, no accelerate here); ``base`` declares what a runner
may rely on in every method module."""
from .base import TrainingMethod, RunLengthError
from .jointrd import JointRD, JointRDConfig, jointrd_loss
from .fading import FadingStudent, ShortcutFade
from .schedules import eta_schedule, fade_scale, block_scales
from .adversarial import AdversarialPortableStudent, ConditionalAdversarialKD, LogitDiscriminator, FeatureDiscriminator
from .stepwise import StepwiseRemoval
