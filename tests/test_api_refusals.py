"""The Python API refuses what would train, deploy or export something else than asked, with a message that says
what was wrong and what to do (each case once passed silently or failed with an unrelated error)."""
import numpy as np
import pytest
import timm
import torch

import jointrd_timm
from jointrd_timm.deploy.export import ExportError, export_model
from jointrd_timm.methods import JointRD
from jointrd_timm.methods.jointrd.config import JointRDConfig
from jointrd_timm.recipes import DEFAULT_RECIPE, recipe_for
from jointrd_timm.settings import Schedule


def _pair(classes=10, **twin):
    return timm.create_model('plain_resnet20_cifar', num_classes=classes, **twin), \
        timm.create_model('resnet20_cifar', num_classes=classes)


def test_jointrd_refuses_swapped_or_wrong_roles():
    twin, teacher = _pair()
    with pytest.raises(ValueError, match='same model object'):
        JointRD(teacher, teacher, JointRDConfig(), num_epochs=1, steps_per_epoch=2)
    with pytest.raises(ValueError, match=r'teacher .* shortcut-free twin.*JointRD\(student, teacher'):
        JointRD(teacher, twin, JointRDConfig(), num_epochs=1, steps_per_epoch=2)
    with pytest.raises(ValueError, match=r'still adds 9 shortcut\(s\) and does not fade'):
        JointRD(timm.create_model('resnet20_cifar', num_classes=10), teacher, JointRDConfig(), num_epochs=1,
                steps_per_epoch=2)
    pair = JointRD(twin, teacher, JointRDConfig(), num_epochs=1, steps_per_epoch=2)  # the right order still builds
    assert pair.student is twin


def test_jointrd_refuses_models_without_a_classifier():
    twin, teacher = _pair(classes=0)
    with pytest.raises(ValueError, match=r'no classifier \(num_classes=0\)'):
        JointRD(twin, teacher, JointRDConfig(), num_epochs=1, steps_per_epoch=2)


def test_progress_counts_are_checked_and_numpy_integers_accepted():
    twin, teacher = _pair()
    pair = JointRD(twin, teacher, JointRDConfig(), num_epochs=np.int64(3), steps_per_epoch=np.int64(4))
    assert (int(pair.num_epochs), int(pair.steps_per_epoch)) == (3, 4)
    for args, name in (((0, -4, 2), 'steps_per_epoch'), ((-1, 4, 2), 'epoch'), ((0, 2.5, 2), 'steps_per_epoch'),
                       ((0, '4', 2), 'steps_per_epoch'), ((0, 4, -2), 'num_epochs')):
        with pytest.raises(ValueError, match=name):
            pair.set_epoch(*args)
    pair.set_epoch(np.int64(1), 4, 3)
    assert int(pair.epoch) == 1


def test_set_shortcut_scale_on_a_model_without_fading_shortcuts():
    with pytest.raises(ValueError, match='no fading shortcuts.*shortcut_fade=True'):
        jointrd_timm.set_shortcut_scale(timm.create_model('resnet20_cifar'), 0.0)


def test_export_refuses_a_fading_twin_and_unknown_formats(tmp_path):
    fading = timm.create_model('plain_resnet20_cifar', num_classes=10, shortcut_fade=True)
    jointrd_timm.set_shortcut_scale(fading, 0.5)
    with pytest.raises(ExportError, match=r'fading twin \(shortcut scale s = 0.5\).*deployable'):
        export_model(fading, tmp_path / 'a', formats=('torchscript',))
    with pytest.raises(ExportError, match=r"\['tflite'\]"):
        export_model(timm.create_model('plain_resnet20_cifar'), tmp_path / 'b', formats=('tflite',))
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


def test_recipe_for_reads_names_as_timm_writes_them():
    measured = recipe_for('resnet20_cifar')
    assert measured.name != DEFAULT_RECIPE.name
    for name in ('RESNET20_CIFAR', ' resnet20_cifar', 'timm/resnet20_cifar.some_tag', 'plain_resnet20_cifar'):
        assert recipe_for(name) is measured
    with pytest.raises(TypeError, match='architecture name'):
        recipe_for(None)
    with pytest.raises(ValueError, match='peak learning rate must be a finite number > 0, got -0.1'):
        DEFAULT_RECIPE.conversion_lr(-0.1)


@pytest.mark.parametrize('field, value', [('epochs', -1), ('batch_size', 0), ('lr', -0.1), ('lr', 0.0),
                                          ('weight_decay', -1.0), ('epochs', 2.5)])
def test_schedule_refuses_impossible_values(field, value):
    fields = dict(epochs=2, batch_size=8, lr=0.1, weight_decay=5e-4)
    with pytest.raises(ValueError, match=f'Schedule.{field}'):
        Schedule('x', **dict(fields, **{field: value}))


def test_api_entry_points_name_a_wrong_argument_type():
    with pytest.raises(TypeError, match="make_plain takes a model instance.*create_model"):
        jointrd_timm.make_plain('resnet18')
    with pytest.raises(TypeError, match='make_fading takes a model instance'):
        jointrd_timm.make_fading(None)
    with pytest.raises(TypeError, match='teacher a model or its state dict'):
        jointrd_timm.load_teacher_weights(timm.create_model('plain_resnet20_cifar'), 'resnet20_cifar')



def test_a_recipe_without_a_fade_refuses_fade_settings_it_would_drop():
    with pytest.raises(ValueError, match=r'shortcut_fade_leak shape the shortcut fade.*shortcut_fade=None'):
        DEFAULT_RECIPE.replace(shortcut_fade=None, shortcut_fade_leak=0.3)
    assert DEFAULT_RECIPE.replace(shortcut_fade=None).fade_fields() == {}


def test_jointrd_names_a_feature_extractor_for_what_it_is():
    from jointrd_timm.methods.stages import StageLayoutError
    teacher = timm.create_model('resnet20_cifar', features_only=True)
    twin = timm.create_model('plain_resnet20_cifar', features_only=True)
    with pytest.raises(StageLayoutError, match=r'feature extractor \(features_only=True\).*without features_only'):
        JointRD(twin, teacher, JointRDConfig(), num_epochs=1, steps_per_epoch=2)
