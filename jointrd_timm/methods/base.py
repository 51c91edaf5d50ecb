"""The training interface: what a runner may rely on in a method module, implemented once.

Every method module (:class:`~jointrd_timm.methods.JointRD`, :class:`~jointrd_timm.methods.FadingStudent`, the
adversarial methods) is a :class:`TrainingMethod`. A runner (ours, torchdistill's boxes through
``jointrd_pre_epoch_process``, or a plain PyTorch loop) relies on exactly this:

* **progress**: ``set_epoch(epoch, steps_per_epoch, num_epochs)`` at the start of each epoch, or the run length
  given once (``set_run_length`` / the ``num_epochs`` and ``steps_per_epoch`` arguments of the method), after
  which the module counts its own training steps: every train-mode forward is one step, and an epoch ends after
  ``steps_per_epoch`` of them. A method whose schedule needs the run length (a fraction of the run) raises a clear
  error at its first train-mode forward when it was never given; a schedule never silently stays constant.
  ``progress`` is in epochs (fractional). The counters are persistent buffers, so a checkpoint (``state_dict``)
  holds them, and whatever they decide in the forward (the fade scale) is recomputed on ``load_state_dict``.
* ``deploy_module()``: the module that is evaluated, saved and exported at the end (the twin).
* ``extra_optimizers()`` / ``extra_schedulers()``: optimisers the module steps itself (a discriminator's), by name,
  so a runner checkpoints and restores them with its own.
* ``epoch_metrics()``: floats worth logging once per epoch (eta, the shortcut scale).
* ``set_grad_accumulation(steps)``: the run's gradient accumulation, which the optimisers the module steps itself
  follow (one step per ``steps`` training steps).
* ``fades_shortcuts``: whether the module takes a fading twin's shortcuts to 0 (a fading twin under anything else
  is refused: :func:`check_fade_driven`); ``run_length_schedules()``: what it lays out over fractions of the run
  (the fade, eta's horizon), so that a run resumed at another length is refused instead of moving them.

Plain modules (a timm model trained with cross-entropy) are trained too: the functions at the bottom give their
defaults (:func:`deploy_module` of a plain module is the module itself, no extra optimisers, no metrics).

DECISION (the adversarial methods): the discriminator's step stays inside the train-mode ``forward`` (D first, then
the student's loss against the updated D), so any torchdistill box, torchdistill's own example script and a plain
loop train these modules with one ``loss.backward(); optimizer.step()`` and no extra call; its optimiser is
declared through ``extra_optimizers()`` so that checkpoints hold it.
"""
import math
import numbers
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..errors import JointRDError
from ..io import input_channels

__all__ = ['TrainingMethod', 'RunLengthError', 'deploy_module', 'extra_optimizers', 'extra_schedulers',
           'epoch_metrics', 'start_epoch', 'set_grad_accumulation', 'keep_frozen', 'config_from_dict',
           'check_teacher_student', 'hinton_kd', 'call_on_buffer_copies', 'check_number', 'check_flag']

PROGRESS_BUFFERS = ('epoch', 'step_in_epoch', 'steps_per_epoch', 'num_epochs')


def hinton_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton, Vinyals & Dean's distillation term: ``T^2 * KL(softmax(z_T / T) || softmax(z_S / T))`` averaged over
    the batch (no gradient reaches the teacher's logits). The one KD of the package: JointRD's ``kd_weight``, APS's
    KD term and the benchmarks' KD rows all call it."""
    t = temperature
    return torch.nn.functional.kl_div(torch.nn.functional.log_softmax(student_logits / t, 1),
                                      torch.nn.functional.softmax(teacher_logits.detach() / t, 1),
                                      reduction='batchmean') * t * t


def call_on_buffer_copies(module: nn.Module, args: tuple, kwargs: Optional[Dict] = None,
                          detach_parameters: bool = False):
    """``module(*args, **kwargs)`` run on copies of its buffers, so that a train-mode BN normalises with the batch
    statistics and its running statistics stay what the module's own forwards made them (the copies are updated and
    dropped). Gradients reach the module's parameters, or with ``detach_parameters`` only the inputs."""
    state = {n: p.detach() if detach_parameters else p for n, p in module.named_parameters()}
    state.update((n, b.clone()) for n, b in module.named_buffers())
    return functional_call(module, state, args, kwargs or {})


def model_name(model: nn.Module) -> str:
    """The architecture a model's ``pretrained_cfg`` names (a timm model's; a torchvision model built by name:
    ``torchvision:resnet18``), else its class name."""
    return (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__


def class_count(model: nn.Module) -> Optional[int]:
    """The classes ``model`` predicts: a timm model's ``num_classes``; for a model without it (torchvision's, a
    user's own) the width of the logits it returns for a small random batch, in eval mode; None when it returns no
    (batch, classes) tensor for it (the method that uses the model says what fails)."""
    classes = getattr(model, 'num_classes', None)
    if classes is not None:
        return classes
    chans, params = input_channels(model), list(model.parameters())
    if chans is None or not params:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.randn(2, chans, 64, 64, device=params[0].device))
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, TypeError):  # a model for another input size: no count, no guess
        return None
    finally:
        model.train(was_training)
    return logits.shape[1] if isinstance(logits, torch.Tensor) and logits.dim() == 2 else None


def _classes_and_channels(model: nn.Module):
    model = getattr(model, 'student', model)  # a method module: its twin
    return class_count(model), input_channels(model)


def check_teacher_student(teacher: nn.Module, student: nn.Module, where: str) -> None:
    """A teacher and a twin (student) must predict the same classes from the same input channels: a 100-class
    teacher's logits against 10-class targets train without an error, and teach nothing. Every method that takes
    a teacher calls this in its constructor; ``where`` names the caller in the message.

    Raises:
        ValueError: naming both models, what differs and how to make them agree.
    """
    if teacher is student:
        raise ValueError(f'{where}: the teacher and the student are the same model object. Give the trained residual '
                         "model as the teacher and its twin as the student (timm.create_model('plain_<arch>', ...), "
                         'or make_plain(copy.deepcopy(teacher))).')
    (t_classes, t_chans), (s_classes, s_chans) = _classes_and_channels(teacher), _classes_and_channels(student)
    t_name, s_name = (model_name(m) for m in (teacher, student))
    for role, name, classes in (('teacher', t_name, t_classes), ('student', s_name, s_classes)):
        if classes == 0:
            raise ValueError(f'{where}: the {role} {name} has no classifier (num_classes=0); the methods train on '
                             'class logits. Create both models with the num_classes of the data.')
    if t_classes is not None and s_classes is not None and t_classes != s_classes:
        raise ValueError(
            f'{where}: the teacher {t_name} predicts {t_classes} classes but the student {s_name} predicts '
            f'{s_classes}. Give both the num_classes of the data (timm.create_model(..., num_classes=...); in a YAML '
            f'the kwargs `num_classes`, e.g. the override models.model.kwargs.student.num_classes={t_classes}); for '
            'a teacher trained on another label set, fine-tune it on this one first, its classifier '
            're-initialised: timm_model with `checkpoint: ...`, `reset_head: true` and '
            f'`num_classes: {s_classes}` in a cross-entropy YAML.')
    if t_chans is not None and s_chans is not None and t_chans != s_chans:
        raise ValueError(f'{where}: the teacher {t_name} takes {t_chans} input channel(s) but the student {s_name} '
                         f'takes {s_chans}; give both the same `in_chans` (the channels of the data).')


class RunLengthError(JointRDError, RuntimeError):
    """A schedule that is a fraction of the run was asked for before the run length was known."""


class TrainingMethod(nn.Module):
    """Base of the method modules: progress counters, the module to deploy, extra optimisers, epoch metrics.

    Subclasses call ``super().__init__(num_epochs, steps_per_epoch)`` and override :meth:`apply_progress` when
    progress decides something in their forward (called after every progress change and after a state-dict load).
    """

    def __init__(self, num_epochs: int = 0, steps_per_epoch: int = 0):
        super().__init__()
        for name in PROGRESS_BUFFERS:
            self.register_buffer(name, torch.zeros((), dtype=torch.long))
        if num_epochs or steps_per_epoch:
            self.set_run_length(num_epochs, steps_per_epoch)
        self.register_load_state_dict_post_hook(_reapply_progress)

    # -- progress ---------------------------------------------------------------------------------------------------
    def set_run_length(self, num_epochs: int, steps_per_epoch: int) -> None:
        """The run's length: ``num_epochs`` epochs of ``steps_per_epoch`` training steps (forwards in train mode)."""
        num_epochs = self._count('num_epochs', num_epochs, 1)
        steps_per_epoch = self._count('steps_per_epoch', steps_per_epoch, 1)
        self.num_epochs.fill_(num_epochs)
        self.steps_per_epoch.fill_(steps_per_epoch)
        self.apply_progress()

    def _count(self, name: str, value, least: int) -> int:
        """``value`` as an int (a numpy integer too), refused unless an integer >= ``least``."""
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            kind = 'a positive integer' if least == 1 else 'an integer >= 0'
            raise ValueError(f'{type(self).__name__}: {name} must be {kind}, got {value!r}.')
        return int(value)

    def set_epoch(self, epoch: int, steps_per_epoch: int = 0, num_epochs: int = 0) -> None:
        """Start of epoch ``epoch`` (0-based); the runner also passes the run length (0: keep the one given)."""
        epoch = self._count('epoch', epoch, 0)
        steps_per_epoch = self._count('steps_per_epoch', steps_per_epoch, 0)
        num_epochs = self._count('num_epochs', num_epochs, 0)
        self.epoch.fill_(epoch)
        self.step_in_epoch.zero_()
        if steps_per_epoch:
            self.steps_per_epoch.fill_(steps_per_epoch)
        if num_epochs:
            self.num_epochs.fill_(num_epochs)
        self.apply_progress()

    @property
    def knows_run_length(self) -> bool:
        return int(self.num_epochs) > 0

    #: whether the method takes a fading twin's shortcut scale to 0 (a fading twin under a method that does not
    #: would train as its residual net and could not deploy)
    fades_shortcuts = False

    def run_length_schedules(self) -> List[str]:
        """What this method lays out over fractions of the run's length (the shortcut fade, eta's horizon): a run
        resumed with another ``num_epochs`` would move them (a finished fade would bring the shortcuts back), so the
        runner refuses that. None here; subclasses name theirs."""
        return []

    @property
    def progress(self) -> float:
        """Epochs elapsed, fractional within an epoch when the steps per epoch are known."""
        progress = float(self.epoch)
        if int(self.steps_per_epoch) > 0:
            progress += float(self.step_in_epoch) / float(self.steps_per_epoch)
        return progress

    def count_step(self) -> None:
        """One training step done (called at the end of the train-mode forward, which applies the progress at its
        start); rolls over to the next epoch after ``steps_per_epoch`` steps, so a loop that never calls
        :meth:`set_epoch` still advances."""
        self.step_in_epoch += 1
        steps = int(self.steps_per_epoch)
        if steps > 0 and int(self.step_in_epoch) >= steps:
            self.epoch += 1
            self.step_in_epoch.zero_()

    def require_run_length(self, what: str) -> None:
        """Raise :class:`RunLengthError` naming ``what`` needs it, unless the run length is known."""
        if not self.knows_run_length:
            raise RunLengthError(
                f'{type(self).__name__}: {what} is a fraction of the run, so the run length must be known before '
                'training: pass num_epochs and steps_per_epoch when building the module (or call '
                'set_run_length(num_epochs, steps_per_epoch)), or call set_epoch(epoch, steps_per_epoch, '
                'num_epochs) at the start of every epoch (the runner and jointrd_pre_epoch_process do).')

    def apply_progress(self) -> None:
        """Set whatever the progress decides in the forward (no-op here)."""

    # -- what stays frozen -------------------------------------------------------------------------------------------
    def frozen_modules(self) -> list:
        """The modules whose parameters the run's optimizer must never hold (``requires_grad=False``): a frozen
        teacher, and whatever a side optimizer trains inside the forward (a discriminator, a joint teacher)."""
        return [side.module for side in self.side_optimizers()]

    def start_stage(self) -> None:
        """A multi-stage run moves to its next stage (:func:`keep_frozen`): torchdistill has unfrozen every
        parameter, and restarts its count of accumulated gradients before it builds that stage's optimizer. Freeze
        :meth:`frozen_modules` again, and drop what the module's own optimizers had accumulated, so they keep step
        with the new stage's optimizer."""
        for module in self.frozen_modules():
            module.requires_grad_(False)
        for side in self.side_optimizers():
            side.reset()

    # -- gradient accumulation --------------------------------------------------------------------------------------
    def side_optimizers(self) -> list:
        """The :class:`~jointrd_timm.methods.side_optimizer.SideOptimizer` s this module steps inside its forward
        (a discriminator's, a joint teacher's)."""
        return []

    def set_grad_accumulation(self, steps: int) -> None:
        """The run steps its optimizer every ``steps`` training steps (gradient accumulation): the optimizers this
        module steps itself accumulate as many, so a discriminator or joint teacher takes as many steps, on as many
        images each, as with the accumulated batch in one piece."""
        for side in self.side_optimizers():
            side.accumulate = steps

    # -- what the runner reads --------------------------------------------------------------------------------------
    def deploy_module(self) -> nn.Module:
        """The module to evaluate, save and export at the end: the twin (``self.student``)."""
        return self.student

    def extra_optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        return {}

    def extra_schedulers(self) -> Dict[str, object]:
        return {}

    def epoch_metrics(self) -> Dict[str, float]:
        return {}


def check_number(value, what: str, minimum: Optional[float] = None, maximum: Optional[float] = None, *,
                 above: bool = False, below: bool = False, integer: bool = False, meaning: str = ''):
    """``value`` as a float (an int with ``integer``), or a ValueError naming ``what``, the range it must lie in
    (``minimum`` / ``maximum``, excluded with ``above`` / ``below``) and what was given. Booleans, strings and
    non-finite numbers are refused."""
    kinds = numbers.Integral if integer else numbers.Real  # numpy's scalars too
    ok = isinstance(value, kinds) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value) \
        and (minimum is None or (value > minimum if above else value >= minimum)) \
        and (maximum is None or (value < maximum if below else value <= maximum))
    if not ok:
        bounds = []
        if minimum is not None:
            bounds.append(f'{">" if above else ">="} {minimum:g}')
        if maximum is not None:
            bounds.append(f'{"<" if below else "<="} {maximum:g}')
        kind = 'an integer' if integer else 'a finite number'
        raise ValueError(f'{what} must be {kind}{" " + " and ".join(bounds) if bounds else ""}'
                         f'{f" ({meaning})" if meaning else ""}, got {value!r}.')
    return int(value) if integer else float(value)


def check_flag(value, what: str) -> bool:
    """``value`` if it is True or False, else a ValueError naming ``what`` (a YAML ``yes`` is already a bool; a
    string such as ``'false'`` is refused rather than read as true)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f'{what} must be true or false, got {value!r}.')
    return bool(value)


def config_from_dict(cls, values: Dict, what: str):
    """``cls(**values)`` for a config dataclass, or a ValueError naming ``what`` and the unknown keys."""
    import dataclasses
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f'Unknown {what} setting(s) {unknown}; valid keys: {sorted(known)}.')
    return cls(**values)


def _reapply_progress(module: TrainingMethod, incompatible_keys) -> None:
    module.apply_progress()


def _method(module: nn.Module) -> Optional[TrainingMethod]:
    return module if isinstance(module, TrainingMethod) else None


def run_length_schedules(module: nn.Module) -> List[str]:
    """:meth:`TrainingMethod.run_length_schedules` of ``module`` (none for a plain module)."""
    method = _method(module)
    return method.run_length_schedules() if method is not None else []


def check_fade_driven(module: nn.Module, where: str) -> None:
    """Refuse a fading twin (``shortcut_fade``) as what ``module`` trains and deploys when nothing fades it: its
    shortcut scale would stay 1 all run, and deploying it would fail at the end."""
    from ..twins.fade import is_fading
    method = _method(module)
    if method is not None and method.fades_shortcuts:
        return
    if is_fading(deploy_module(module)):
        raise ValueError(
            f'{where}: the model is a fading twin (shortcut_fade: true), and '
            + (f'{type(method).__name__}' if method is not None else 'a plain training run')
            + ' never fades its shortcuts: it would train as the residual network and fail to deploy. Train it '
            'with a method that fades them (fading_model, jointrd_model with jointrd.shortcut_fade, stepwise), or '
            'build the twin without shortcut_fade.')


def deploy_module(module: nn.Module) -> nn.Module:
    """What a runner evaluates and saves for ``module``: a method's twin, or the plain module itself."""
    method = _method(module)
    return method.deploy_module() if method is not None else module


def extra_optimizers(module: nn.Module) -> Dict[str, torch.optim.Optimizer]:
    method = _method(module)
    return method.extra_optimizers() if method is not None else {}


def extra_schedulers(module: nn.Module) -> Dict[str, object]:
    method = _method(module)
    return method.extra_schedulers() if method is not None else {}


def epoch_metrics(module: nn.Module) -> Dict[str, float]:
    method = _method(module)
    return method.epoch_metrics() if method is not None else {}


def set_grad_accumulation(module: nn.Module, steps: int) -> None:
    """Tell ``module`` the run accumulates ``steps`` micro-batches per optimizer step (a no-op for plain modules)."""
    method = _method(module)
    if method is not None:
        method.set_grad_accumulation(int(steps or 1))


def keep_frozen(box) -> None:
    """Make a torchdistill box call its method module's :meth:`~TrainingMethod.start_stage` after each of its
    ``clean_modules`` calls (a multi-stage box unfreezes every parameter of its models there, then builds the next
    stage's optimizer from the trainable ones: without this, that optimizer would train a frozen teacher and step a
    discriminator's own gradients). Idempotent; a no-op for boxes without a method module."""
    if getattr(box, '_jointrd_keeps_frozen', False) or not hasattr(box, 'clean_modules'):
        return
    clean = box.clean_modules
    models = [getattr(box, name, None) for name in ('org_model', 'org_student_model', 'model', 'student_model')]

    def clean_and_refreeze(*args, **kwargs):
        out = clean(*args, **kwargs)
        for model in models:
            method = _method(getattr(model, 'module', model))  # a DDP wrapper's module
            if method is not None:
                method.start_stage()
        return out

    box.clean_modules = clean_and_refreeze
    box._jointrd_keeps_frozen = True


def start_epoch(module: nn.Module, epoch: int, steps_per_epoch: int, num_epochs: int) -> None:
    """Tell ``module`` an epoch starts (a no-op for plain modules)."""
    method = _method(module)
    if method is not None:
        method.set_epoch(epoch, steps_per_epoch, num_epochs)
