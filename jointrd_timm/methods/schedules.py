"""eta(e): the weight of JointRD's hybrid (student stage -> teacher tail) terms over training."""
import math

__all__ = ['eta_schedule']


def eta_schedule(progress: float, eta_min: float, horizon: float) -> float:
    """Cosine fade from 1 to ``eta_min`` over ``horizon`` epochs, then ``eta_min`` (Li et al. 2020, sec. 3).

    eta(e) = eta_min + (1 - eta_min) * (1 + cos(pi * e / E)) / 2 for e <= E, else eta_min.
    ``progress`` is in epochs and may be fractional (per-step annealing). ``horizon <= 0`` means eta_min at once.
    """
    if horizon <= 0 or progress >= horizon:
        return float(eta_min)
    return float(eta_min + (1.0 - eta_min) * (1.0 + math.cos(math.pi * max(progress, 0.0) / horizon)) / 2.0)
