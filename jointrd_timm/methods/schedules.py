"""The schedules of training: eta(e), the weight of JointRD's hybrid (student stage -> teacher tail) terms, and
s(e), the shortcut scale of a fading twin (Monti et al. 2018), with its per-block staggering. Both are functions
of the training progress in epochs (fractional when per step); :mod:`methods.fading` applies ``s`` to a model."""
import math

__all__ = ['eta_schedule', 'fade_scale', 'block_scales', 'check_fade_power', 'capped_fade_horizon', 'FADE_ORDERS',
           'check_fade_order']

# which end of the network a staggered fade (window < 1) removes first: the stem's or the head's
FADE_ORDERS = ('shallow_first', 'deep_first')


def eta_schedule(progress: float, eta_min: float, horizon: float) -> float:
    """Cosine fade from 1 to ``eta_min`` over ``horizon`` epochs, then ``eta_min`` (Li et al. 2020, sec. 3).

    eta(e) = eta_min + (1 - eta_min) * (1 + cos(pi * e / E)) / 2 for e <= E, else eta_min.
    ``progress`` is in epochs and may be fractional (per-step annealing). ``horizon <= 0`` means eta_min at once.
    """
    if horizon <= 0 or progress >= horizon:
        return float(eta_min)
    return float(eta_min + (1.0 - eta_min) * (1.0 + math.cos(math.pi * max(progress, 0.0) / horizon)) / 2.0)


def check_fade_power(power: float) -> float:
    """``power`` as a float, or a ValueError saying what a fade power must be."""
    if not (isinstance(power, (int, float)) and not isinstance(power, bool) and math.isfinite(power) and power > 0):
        raise ValueError(f'shortcut_fade_power must be a finite number > 0 (1: the cosine fade itself; 0.5: its '
                         f'square root, for a twin twice as deep as the one the fade was tuned on), got {power!r}.')
    return float(power)


def fade_scale(progress: float, horizon: float, power: float = 1.0) -> float:
    """``s`` after ``progress`` epochs: cosine from 1 to 0 over ``horizon`` epochs, then 0 (DECISION: the eta
    schedule's shape, :func:`eta_schedule` with eta_min 0; Monti et al. lower it by their own rule, not a fixed
    schedule), raised to ``power``.

    ``power`` (DECISION, depth matching): a stage of N blocks passes its input along its shortcut path scaled by
    ``s ** N``, so the same ``s`` removes that path much sooner in a deeper twin. ``power = N_ref / N`` gives a twin
    with N blocks per stage the shortcut-path weights of the depth the schedule was tuned at (resnet56: 9 blocks
    per stage; 0.5 for resnet110). Any power keeps s = 1 at the start and s = 0 from the horizon on. Measured in
    benchmarks/results/recipe_ablation_resnet110.md."""
    power = check_fade_power(power)
    if horizon <= 0 or progress >= horizon:
        return 0.0
    return float((1.0 + math.cos(math.pi * max(progress, 0.0) / horizon)) / 2.0) ** power


def capped_fade_horizon(fraction: float, num_epochs: int, steps_per_epoch: int) -> float:
    """The fade's horizon in epochs: ``fraction`` of the run, capped at the last training step's progress.

    DECISION: the fade ends at the last training step at the latest, so that a run always finishes at ``s = 0``
    and its twin can be deployed, whatever the fraction (1.0 included) and however few steps an epoch has."""
    horizon = fraction * num_epochs
    if steps_per_epoch > 0:
        horizon = min(horizon, num_epochs - 1.0 / steps_per_epoch)
    return horizon


def block_scales(value: float, blocks: int, window: float = 1.0, order: str = 'shallow_first') -> list:
    """Each fading block's own ``s`` when the run's scale is ``value``, blocks in forward order.

    ``window = 1``: every block gets ``value`` (one fade shared by all blocks). ``window < 1``: a *staggered* fade;
    with fade progress ``t = 1 - value``, the ``k``-th block to fade (of ``n``) fades over its own stretch of length
    ``window`` that starts at ``(1 - window) * k / (n - 1)``, and at ``value = 0`` every block is at 0. ``order``:
    'shallow_first' (the first block in forward order fades first, the last one last) or 'deep_first' (the
    reverse: the blocks next to the head lose their shortcuts while those next to the stem keep theirs).

    DECISION (not in Monti et al., who fade all skips together): in a deep net one shared ``s < 1`` shrinks the
    shortcut path through N blocks by ``s ** N`` (0.9 ** 54 = 0.004 at depth 110), so the deep twin changes abruptly
    even early in the fade; staggering lets the blocks drop their shortcuts one group at a time. (The blocks' mean
    scale is ``value`` only midway; the logged scale is the run's ``value``.)"""
    if not 0 < window <= 1:
        raise ValueError(f'the fade window must be in (0, 1] (1: all blocks fade together), got {window}.')
    check_fade_order(order)
    if window >= 1 or blocks <= 1:
        return [float(value)] * blocks
    t = 1.0 - float(value)
    scales = [1.0 - min(max((t - (1.0 - window) * k / (blocks - 1)) / window, 0.0), 1.0) for k in range(blocks)]
    return scales if order == 'shallow_first' else scales[::-1]


def check_fade_order(order: str) -> str:
    """``order``, or a ValueError saying what a staggered fade's order must be."""
    if order not in FADE_ORDERS:
        raise ValueError(f'shortcut_fade_order must be one of {FADE_ORDERS} (which blocks of a staggered fade lose '
                         f'their shortcuts first), got {order!r}.')
    return order
