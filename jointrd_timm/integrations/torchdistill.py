"""jointrd_timm in torchdistill's registries, so a YAML with ``dependencies: [{name: jointrd_timm}]`` selects it.

Registered here:
* models ``timm_model`` (any timm or plain_* model, optional safetensors checkpoint), ``jointrd_model``
  (teacher + twin as one :class:`~jointrd_timm.methods.JointRD` module), ``fading_model`` (a twin whose
  shortcuts fade out, trained alone), ``stepwise_model`` (shortcuts removed one at a time under a frozen teacher,
  Tailor, Weng et al. 2023), ``cakd_model`` (conditional adversarial KD, Xu et al. 2017) and ``aps_model``
  (adversarial portable students, Wang et al. 2018);
* the lr scheduler ``HoldCosineLR`` (a Schedule's 'hold-cosine' decay, ``methods.lr_schedules``);
* the mid-level loss ``MethodLoss``: returns the loss these modules compute in their forward (``JointRDLoss``, its
  former name, is a deprecated alias);
* the pre-epoch process ``jointrd_pre_epoch_process``: torchdistill's default, then ``set_epoch`` on the module
  (eta for JointRD, the discriminator's schedule for the adversarial methods, the removals of stepwise_model).

Why JointRD is a *model* in the student slot of a TrainingBox rather than a student wrapper in a DistillationBox:
its loss runs the student's stage outputs through the teacher's later stages, with gradients, and torchdistill's
student wrappers never see the teacher. The teacher therefore lives inside the JointRD module (frozen, eval mode).

``accelerator_for_boxes`` works around torchdistill 1.1.5 reading ``accelerator.state.use_fp16`` (gone from
accelerate) when a DistillationBox has a frozen teacher.
"""
import warnings
from typing import Dict, Optional

import timm
import torch
from torch import nn
from torchdistill.core.interfaces.pre_epoch_proc import default_pre_epoch_process_without_teacher
from torchdistill.core.interfaces.registry import register_pre_epoch_proc_func
from torchdistill.losses.registry import register_mid_level_loss
from torchdistill.models.registry import register_model
from torchdistill.optim.registry import register_scheduler

from ..methods.adversarial import AdversarialPortableStudent, ConditionalAdversarialKD
from ..methods.base import check_teacher_student, class_count, keep_frozen, set_grad_accumulation, start_epoch
from ..methods.fading import FadingStudent, ShortcutFade
from ..methods.jointrd import JointRD, JointRDConfig
from ..methods.lr_schedules import HoldCosineLR, set_scheduler_run_length
from ..methods.stepwise import StepwiseRemoval
from ..models.plain_twins import teacher_of
from ..models.torchvision_models import create_torchvision_model, torchvision_name
from ..twins.transfer import load_teacher_weights
from ..io import classifier_name, load_weights, unwrap

__all__ = ['timm_model', 'check_pair', 'jointrd_model', 'fading_model', 'stepwise_model', 'cakd_model', 'aps_model',
           'MethodLoss', 'JointRDLoss', 'jointrd_pre_epoch_process', 'accelerator_for_boxes']


@register_model
def timm_model(model_name: str, checkpoint: Optional[str] = None, reset_head: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(model_name, **kwargs)``, then the weights of ``checkpoint`` (a .safetensors file or a
    runner output folder) loaded strictly. ``model_name`` may be ``hf-hub:``/``local-dir:`` or a plain_* twin, or
    name a torchvision model or its twin (``torchvision:resnet18``, ``plain_torchvision:resnet18``:
    :mod:`jointrd_timm.models.torchvision_models`).
    ``reset_head``: load everything but the classifier, which keeps its fresh initialisation for ``num_classes``
    classes (a model trained on another label set, to be fine-tuned on this one); with ``pretrained=True`` the
    classifier timm loaded is initialised afresh (``reset_classifier``), also when it has as many classes."""
    torchvision = torchvision_name(model_name) is not None  # torchvision:<name>, plain_torchvision:<name>
    if torchvision:
        # reset_head without a checkpoint: the classifier of its torchvision weights is made fresh there
        model = create_torchvision_model(model_name, reset_head=bool(reset_head and not checkpoint), **kwargs)
    else:
        model = timm.create_model(model_name, **kwargs)
    if checkpoint:
        load_weights(model, checkpoint, skip=classifier_name(model) if reset_head else None)
    elif reset_head and kwargs.get('pretrained') and not torchvision:
        model.reset_classifier(model.num_classes)
    elif reset_head and not torchvision:
        raise ValueError(f'timm_model {model_name}: reset_head needs weights whose head to reset (a checkpoint, or '
                         'pretrained=True).')
    return model


def check_pair(teacher: nn.Module, student: nn.Module, where: str) -> None:
    """The methods' own teacher / student check (:func:`jointrd_timm.methods.base.check_teacher_student`), run on
    the YAML's models before a method is built."""
    check_teacher_student(teacher, student, where)


@register_model
def jointrd_model(teacher: Dict, student: Optional[Dict] = None, jointrd: Optional[Dict] = None,
                  init_student_from_teacher: bool = False) -> JointRD:
    """Teacher + twin for JointRD.

    Args:
        teacher: kwargs of :func:`timm_model` for the residual teacher (give ``checkpoint`` for a trained one).
        student: kwargs of :func:`timm_model` for the twin; default ``plain_<teacher model_name>`` with the
            teacher's ``num_classes``/``in_chans`` (a torchvision teacher's builder arguments but its weights).
        jointrd: fields of :class:`JointRDConfig`.
        init_student_from_teacher: start the twin from the teacher's weights (load_teacher_weights).
    """
    jointrd = jointrd or {}
    teacher_model, student_model = _teacher_and_student(teacher, student,
                                                        teacher_trains=jointrd.get('teacher_mode') == 'joint')
    if init_student_from_teacher:
        load_teacher_weights(student_model, teacher_model)
    return JointRD(student_model, teacher_model, JointRDConfig.from_dict(jointrd))


def _teacher_and_student(teacher: Dict, student: Optional[Dict], teacher_trains: bool = False, **student_kwargs):
    """The teacher and the student of a YAML's kwargs (``student_kwargs`` added to the student's). A teacher that
    stays frozen (``teacher_trains`` False) may not have its classifier re-initialised (``reset_head``): every
    target it gives would come from random weights."""
    name = str(teacher.get('model_name', ''))
    if teacher.get('reset_head') and not teacher_trains:
        raise ValueError(f'teacher {name}: reset_head re-initialises the classifier of a teacher that stays frozen, '
                         'so every target it gives the student would come from a random head. Fine-tune the teacher '
                         'on these classes first (jointrd distill --num-classes does), then give that checkpoint '
                         'without reset_head.')
    if not (teacher.get('checkpoint') or teacher.get('pretrained') or teacher.get('weights')
            or name.lower().startswith(('hf-hub', 'hf_hub', 'local-dir'))):
        how = ('weights=a torchvision weights name' if torchvision_name(name) is not None else
               'pretrained=true with a name.tag')
        warnings.warn(f'The teacher {name} is given no weights (no checkpoint, pretrained or hub id): the student '
                      f'learns from a randomly initialised network. Give its weights (teacher kwargs: '
                      f'checkpoint=PATH, or {how}).', stacklevel=2)
    teacher_model = timm_model(**teacher)
    if student is None:
        student = architecture_kwargs(teacher)
        student['model_name'] = 'plain_' + teacher['model_name']
    student_model = timm_model(**dict(student, **student_kwargs))
    check_pair(teacher_model, student_model, 'teacher / student kwargs')
    return teacher_model, student_model


def architecture_kwargs(model: Dict) -> Dict:
    """The kwargs of ``model`` (a timm_model kwargs dict) that shape its architecture, for its twin or teacher:
    ``num_classes`` and ``in_chans``; for a torchvision name every builder argument (``width_mult``, ...) but its
    weights and the twin's own arguments."""
    if torchvision_name(str(model.get('model_name', ''))) is None:
        return {k: v for k, v in model.items() if k in ('num_classes', 'in_chans')}
    return {k: v for k, v in model.items() if k not in (
        'model_name', 'checkpoint', 'reset_head', 'weights', 'shortcut_fade', 'keep_projection_shortcuts')}


@register_model
def fading_model(student: Dict, shortcut_fade: float, teacher_checkpoint: Optional[str] = None,
                 shortcut_fade_window: float = ShortcutFade.window, shortcut_fade_power: float = ShortcutFade.power,
                 shortcut_fade_mode: str = ShortcutFade.mode,
                 shortcut_fade_order: str = ShortcutFade.order,
                 shortcut_fade_leak: float = ShortcutFade.leak) -> FadingStudent:
    """A fading twin trained alone (cross-entropy; :class:`~jointrd_timm.methods.fading.FadingStudent`).

    Args:
        student: kwargs of :func:`timm_model` for the twin; ``shortcut_fade=True`` is implied.
        shortcut_fade: fraction of the run over which the shortcut scale goes from 1 to 0.
        teacher_checkpoint: start from these teacher weights (a .safetensors file or a runner output folder).
        shortcut_fade_window: 1: all blocks fade together; < 1: staggered (``methods.schedules.block_scales``).
        shortcut_fade_power: the cosine fade raised to this power (``methods.schedules.fade_scale``).
        shortcut_fade_mode: 'scale' or 'share' (``methods.fading.ShortcutFade``).
        shortcut_fade_order: 'shallow_first' or 'deep_first', the order of a staggered fade.
        shortcut_fade_leak: the peak negative slope of the twin's ReLUs during the fade (0: plain ReLUs).
    """
    fade = ShortcutFade(shortcut_fade, shortcut_fade_window, shortcut_fade_power, shortcut_fade_mode,
                        shortcut_fade_order, shortcut_fade_leak)
    model = timm_model(**dict(student, shortcut_fade=True))
    if teacher_checkpoint:
        teacher = timm_model(teacher_of(student['model_name']), **architecture_kwargs(student))
        load_weights(teacher, teacher_checkpoint)
        load_teacher_weights(model, teacher)
    return FadingStudent(model, fade)


@register_model
def stepwise_model(teacher: Dict, student: Optional[Dict] = None, interval: float = 3, order: str = 'input_first',
                   first_removal: Optional[float] = None, mse_weight: float = 0.35,
                   ce_weight: float = 0.65) -> StepwiseRemoval:
    """Step-wise shortcut removal under a frozen teacher (Tailor, Weng et al. 2023;
    :class:`~jointrd_timm.methods.stepwise.StepwiseRemoval`): the twin is built fading (``shortcut_fade=True``
    implied) and started from the teacher's weights, then loses one shortcut every ``interval`` epochs.

    Args:
        teacher: kwargs of :func:`timm_model` for the residual teacher (give ``checkpoint`` for a trained one).
        student: kwargs of :func:`timm_model` for the twin; default ``plain_<teacher model_name>``.
        interval, order, first_removal, mse_weight, ce_weight: :class:`StepwiseRemoval`'s.
    """
    teacher_model, student_model = _teacher_and_student(teacher, student, shortcut_fade=True)
    load_teacher_weights(student_model, teacher_model)
    return StepwiseRemoval(student_model, teacher_model, interval, order, first_removal, mse_weight, ce_weight)


@register_model
def cakd_model(teacher: Dict, student: Optional[Dict] = None, **kwargs) -> ConditionalAdversarialKD:
    """Conditional adversarial KD (Xu et al. 2017). ``teacher``/``student``: :func:`timm_model` kwargs (student
    default: the teacher's twin); ``kwargs``: :class:`ConditionalAdversarialKD` fields (discriminator_depth,
    dropout, non_saturating, discriminator: {lr, momentum, weight_decay, milestones, gamma, cosine_epochs})."""
    teacher_model, student_model = _teacher_and_student(teacher, student)
    return ConditionalAdversarialKD(student_model, teacher_model, class_count(student_model), **kwargs)


@register_model
def aps_model(teacher: Dict, student: Optional[Dict] = None, **kwargs) -> AdversarialPortableStudent:
    """Adversarial learning of portable students (Wang et al. 2018, our reading). ``kwargs``:
    :class:`AdversarialPortableStudent` fields."""
    teacher_model, student_model = _teacher_and_student(teacher, student)
    return AdversarialPortableStudent(student_model, teacher_model, **kwargs)


@register_mid_level_loss
class MethodLoss(nn.Module):
    """Returns the loss that the method module computed in its train-mode forward (a jointrd_model, stepwise_model,
    cakd_model or aps_model: the objective is the module's, this loss only reads it). Use
    ``forward_proc: forward_batch_target`` so the module receives the targets.

    YAML::

        criterion:
          key: 'WeightedSumLoss'
          kwargs:
            sub_terms:
              method: {criterion: {key: 'MethodLoss', kwargs: {module_path: '.'}}, weight: 1.0}
    """

    def __init__(self, module_path: str = '.', **kwargs):
        super().__init__()
        self.module_path = module_path

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs):
        outputs = student_io_dict[self.module_path]['output']
        if not isinstance(outputs, dict) or 'loss' not in outputs:
            raise ValueError(f'{type(self).__name__} reads the loss that a jointrd_model (or stepwise_model, '
                             'cakd_model, aps_model) computes in train mode; the student must be a `jointrd_model` and '
                             'train.model.forward_proc must be forward_batch_target.')
        return outputs['loss']


@register_mid_level_loss
class JointRDLoss(MethodLoss):
    """Deprecated name of :class:`MethodLoss` (it computes no JointRD objective; it returns the module's loss).
    YAMLs that name it keep working, with a DeprecationWarning."""

    def __init__(self, module_path: str = '.', **kwargs):
        warnings.warn("the loss key 'JointRDLoss' is deprecated: name it 'MethodLoss' (it returns the loss the "
                      'method module computed).', DeprecationWarning, stacklevel=2)
        super().__init__(module_path, **kwargs)


@register_pre_epoch_proc_func
def jointrd_pre_epoch_process(self, epoch=None, **kwargs):
    """torchdistill's default pre-epoch process, then the epoch and run length handed to the method module
    (``methods.base.start_epoch``: eta, the shortcut fade, the discriminator's schedule), the gradient accumulation
    its own optimizers follow (``set_grad_accumulation``), and the run length to a per-step lr scheduler that needs
    it (``HoldCosineLR``)."""
    default_pre_epoch_process_without_teacher(self, epoch=epoch, **kwargs)
    set_scheduler_run_length(self.lr_scheduler, len(self.train_data_loader), self.num_epochs,
                             getattr(self, 'grad_accum_step', 1))
    start_epoch(unwrap(self.model), epoch or 0, len(self.train_data_loader), self.num_epochs)
    set_grad_accumulation(unwrap(self.model), getattr(self, 'grad_accum_step', 1))
    keep_frozen(self)  # epoch 0's call comes before any stage advance


# the per-step 'hold-cosine' decay of a Schedule (Recipe.lr_hold), by its class name
register_scheduler(HoldCosineLR)


class _StateWithFp16:
    def __init__(self, state):
        self._state = state

    @property
    def use_fp16(self) -> bool:
        return self._state.mixed_precision == 'fp16'

    def __getattr__(self, name):
        return getattr(self._state, name)


class accelerator_for_boxes:  # noqa: N801 - a thin proxy, named for what it is used for
    """An accelerate.Accelerator as torchdistill 1.1.5's boxes expect it (``state.use_fp16``); everything else is
    the real accelerator. Remove once torchdistill stops reading ``use_fp16`` (tests/test_torchdistill.py checks)."""

    def __init__(self, accelerator):
        self._accelerator = accelerator
        self.state = _StateWithFp16(accelerator.state)

    def __getattr__(self, name):
        return getattr(self._accelerator, name)
