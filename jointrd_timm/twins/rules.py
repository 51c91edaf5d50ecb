"""The rule registry: how each residual block class of timm loses its shortcut.

A rule is looked up by the exact class of a block (subclasses need their own rule, because a subclass may
change ``forward``). Applying a rule edits the block in place and reports whether it kept a projection
shortcut. Two kinds cover every family:

* :func:`switch_rule` for blocks timm already lets go of their shortcut through an attribute
  (``has_skip``, ``shortcut``, ``downsample``, ``identity``): the attribute is set to its "off" value.
* :func:`swap_rule` for blocks whose ``forward`` always adds the shortcut: the instance's class is swapped for
  a plain subclass whose ``forward`` adds the shortcut only when its projection module is still present.
  Swapping the class (never patching ``forward`` on the instance) keeps TorchScript working.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Type

from torch import nn

__all__ = ['ShortcutRule', 'register_rule', 'get_rule', 'rules', 'swap_rule', 'switch_rule', 'is_projection',
           'hand_projection', 'handed_projection_child', 'handed_projections', 'drop_scales', 'dropped_scales',
           'record_model_args']


@dataclass(frozen=True)
class ShortcutRule:
    """How to make one block class shortcut-free.

    Args:
        block_class: the timm class the rule applies to (matched exactly).
        apply: ``apply(block, keep_projection) -> bool`` edits the block in place and returns True when it
            kept a projection shortcut (only possible with ``keep_projection=True``). With ``replaces=True`` it
            returns ``(new_block, kept)`` instead, and make_plain puts ``new_block`` in the block's place.
        description: one line shown by ``jointrd derive``.
        replaces: see ``apply`` (the graph rules of :mod:`jointrd_timm.twins.graph_rule`).
    """
    block_class: Type[nn.Module]
    apply: Callable
    description: str
    replaces: bool = False

    @property
    def name(self) -> str:
        return f'{self.block_class.__module__.split(".")[-1]}.{self.block_class.__qualname__}'


_RULES: Dict[Type[nn.Module], ShortcutRule] = {}
# plain classes created by swap rules map back to their rule, so an already plain model is recognised
_PLAIN_CLASSES: Dict[Type[nn.Module], ShortcutRule] = {}


def register_rule(rule: ShortcutRule) -> ShortcutRule:
    if rule.block_class in _RULES:
        raise ValueError(f'A shortcut rule for {rule.name} is already registered.')
    _RULES[rule.block_class] = rule
    return rule


def get_rule(block: nn.Module) -> Optional[ShortcutRule]:
    """The rule for this block's exact class, or for the residual class a plain block was made from."""
    cls = type(block)
    return _RULES.get(cls) or _PLAIN_CLASSES.get(cls) or getattr(cls, 'jointrd_plain_rule', None)


def rules() -> Dict[Type[nn.Module], ShortcutRule]:
    return dict(_RULES)


# blocks whose plain class drops number attributes that scale the residual sum (multiplies by them become x 1):
# block class -> attribute names. A fading twin takes each from its value at s = 1 to 1 at s = 0 (twins.fade).
_DROPPED_SCALES: Dict[Type[nn.Module], Tuple[str, ...]] = {}


def drop_scales(block_class: Type[nn.Module], *names: str) -> None:
    """Declare that ``block_class``'s plain twin does not multiply by the number attributes ``names`` (each read
    as ``tensor * self.<name>`` in its forward): its fading twin scales them with the shortcuts, so that at s = 0
    it is the plain twin exactly."""
    _DROPPED_SCALES[block_class] = tuple(names)


def dropped_scales(block: nn.Module) -> Tuple[str, ...]:
    """The number attributes ``block``'s plain twin drops (:func:`drop_scales`); empty for most blocks."""
    return _DROPPED_SCALES.get(type(block), ())


# blocks that compute a projection and hand it to a child block as that child's shortcut argument:
# block class -> (projection attribute, child attribute)
_HANDED: Dict[Type[nn.Module], Tuple[str, str]] = {}


def hand_projection(block_class: Type[nn.Module], projection_attr: str, child_attr: str) -> None:
    """Declare that ``block_class`` computes ``<projection_attr>`` and hands it to ``<child_attr>`` as its shortcut
    (DLA's tree: ``tree1(x, project(bottom))``). The fade reads it: a kept projection's addition sits in the child,
    which must then keep its shortcut whole."""
    _HANDED[block_class] = (projection_attr, child_attr)


def handed_projection_child(block: nn.Module) -> Optional[str]:
    """The attribute name of the child that ``block`` (residual, or made plain by a swap rule) hands a projection
    (not an identity) to, else None."""
    rule = get_rule(block)
    projection_attr, child_attr = _HANDED.get(rule.block_class if rule else type(block), (None, None))
    if projection_attr is None or not is_projection(getattr(block, projection_attr, None)):
        return None
    return child_attr


def handed_projections(model: nn.Module) -> Dict[str, str]:
    """For each block of ``model`` that its parent hands a projection (not an identity) as its shortcut: its name ->
    the parent's name, in module order."""
    return {f'{name}.{child}' if name else child: name for name, module in model.named_modules()
            for child in [handed_projection_child(module)] if child}


def is_projection(module: Optional[nn.Module]) -> bool:
    """A shortcut module that changes the tensor (stride or width): anything but None / nn.Identity."""
    return module is not None and not isinstance(module, nn.Identity)


def swap_rule(block_class: Type[nn.Module], plain_class: Type[nn.Module], projection_attr: str) -> ShortcutRule:
    """Rule that swaps ``block_class`` for ``plain_class``; ``projection_attr`` names the projection module
    (None or nn.Identity when the shortcut is an identity). ``plain_class.forward`` must add
    ``self.<projection_attr>(input)`` only when that attribute is not None."""

    def apply(block: nn.Module, keep_projection: bool) -> bool:
        keep = keep_projection and is_projection(getattr(block, projection_attr, None))
        if not keep:
            setattr(block, projection_attr, None)
        block.__class__ = plain_class
        return keep

    rule = register_rule(ShortcutRule(
        block_class, apply, f'class swapped to {plain_class.__name__}; `{projection_attr}` removed'
        ' (kept if a projection and keep_projection_shortcuts)'))
    _PLAIN_CLASSES[plain_class] = rule
    return rule


def switch_rule(
        block_class: Type[nn.Module],
        attr: str,
        off_value=None,
        projection_attr: Optional[str] = None,
) -> ShortcutRule:
    """Rule for blocks with a built-in off switch: ``block.<attr> = off_value``. When ``projection_attr`` is
    given and that module is a projection, ``keep_projection`` leaves the block untouched."""

    def apply(block: nn.Module, keep_projection: bool) -> bool:
        if keep_projection and projection_attr is not None and is_projection(getattr(block, projection_attr, None)):
            return True
        setattr(block, attr, off_value)
        return False

    return register_rule(ShortcutRule(block_class, apply, f'`{attr}` set to {off_value!r} (timm\'s own switch)'))


def record_model_args(model: nn.Module, **changes) -> None:
    """Keep what ``model`` says it was built with true after it changed in place: timm's ``_model_args`` (what its
    ``save_for_hf`` / ``push_to_hub`` write into config.json, so a reload builds the same model) and
    ``pretrained_model_args``. Each key given and recorded takes its new value; None removes it."""
    for attr in ('pretrained_model_args', '_model_args'):
        args = getattr(model, attr, None)
        if not isinstance(args, dict):
            continue
        new = {k: changes.get(k, v) for k, v in args.items()}
        if new != args:
            setattr(model, attr, {k: v for k, v in new.items() if v is not None})
