"""The methods refuse a teacher and a twin that disagree on classes or input channels, in their constructors (the
plain-PyTorch API), with the same message as the YAML factory; and they refuse settings of the wrong type or range
by name (JointRDConfig, the adversarial methods and their discriminator's SGD, the joint teacher's SGD)."""
import pytest
import timm

import jointrd_timm
from jointrd_timm.methods import JointRD, JointRDConfig
from jointrd_timm.methods.adversarial import AdversarialPortableStudent, ConditionalAdversarialKD
from jointrd_timm.integrations.torchdistill import jointrd_model

BUILD = {
    'JointRD': lambda s, t: JointRD(s, t, JointRDConfig()),
    'ConditionalAdversarialKD': lambda s, t: ConditionalAdversarialKD(s, t, num_classes=10),
    'AdversarialPortableStudent': lambda s, t: AdversarialPortableStudent(s, t),
}


@pytest.mark.parametrize('method', sorted(BUILD))
def test_class_count_mismatch_is_refused_by_the_method(method):
    teacher = timm.create_model('resnet20_cifar', num_classes=100)
    twin = timm.create_model('plain_resnet20_cifar', num_classes=10)
    with pytest.raises(ValueError, match=rf'{method}: the teacher resnet20_cifar predicts 100 classes but the '
                                         r'student plain_resnet20_cifar predicts 10\. Give both the num_classes'):
        BUILD[method](twin, teacher)


@pytest.mark.parametrize('method', sorted(BUILD))
def test_input_channel_mismatch_is_refused_by_the_method(method):
    teacher = timm.create_model('resnet20_cifar', num_classes=10, in_chans=1)
    twin = timm.create_model('plain_resnet20_cifar', num_classes=10)
    with pytest.raises(ValueError, match=rf'{method}: the teacher resnet20_cifar takes 1 input channel\(s\) but the '
                                         r'student plain_resnet20_cifar takes 3; give both the same `in_chans`'):
        BUILD[method](twin, teacher)


def test_matching_pair_builds_and_yaml_factory_says_the_same():
    teacher = timm.create_model('resnet20_cifar', num_classes=10)
    twin = timm.create_model('plain_resnet20_cifar', num_classes=10)
    assert isinstance(BUILD['JointRD'](twin, teacher), JointRD)
    with pytest.raises(ValueError, match=r'teacher / student kwargs: the teacher resnet20_cifar predicts 100 classes'):
        jointrd_model(teacher=dict(model_name='resnet20_cifar', num_classes=100),
                      student=dict(model_name='plain_resnet20_cifar', num_classes=10))


def test_fading_student_gets_its_teacher_through_a_checked_load():
    """The fading student has no teacher module: its teacher's weights enter through load_teacher_weights, which
    refuses another class count naming the classifier's shapes."""
    teacher = timm.create_model('resnet20_cifar', num_classes=100)
    twin = timm.create_model('plain_resnet20_cifar', num_classes=10, shortcut_fade=True)
    with pytest.raises(ValueError, match=r'fc\.weight: twin \(10, 64\) vs teacher \(100, 64\)'):
        jointrd_timm.load_teacher_weights(twin, teacher)


@pytest.mark.parametrize('fields,message', [
    (dict(kd_weight=1.0, kd_temperature=0), r'kd_temperature must be a finite number > 0'),
    (dict(kd_temperature='x'), r"kd_temperature must be a finite number > 0 .*got 'x'"),
    (dict(kd_weight=float('nan')), r'kd_weight must be a finite number >= 0 .*got nan'),
    (dict(kd_weight=-1), r'kd_weight must be a finite number >= 0'),
    (dict(eta_horizon=0), r'eta_horizon must be a finite number > 0'),
    (dict(eta_min='x'), r"eta_min must be a finite number >= 0 and <= 1 .*got 'x'"),
    (dict(eta_horizon_fraction=1.5), r'eta_horizon_fraction must be a finite number > 0 and <= 1'),
    (dict(feature_loss_weight=-1), r'feature_loss_weight must be'),
    (dict(adversarial_weight=-0.1), r'adversarial_weight must be'),
    (dict(hybrid_paths=1.5), r'hybrid_paths must be an integer >= 1'),
    (dict(hybrid_paths='x'), r'hybrid_paths must be an integer >= 1'),
    (dict(hybrid_paths=True), r'hybrid_paths must be an integer >= 1'),
    (dict(eta_per_step='x'), r"eta_per_step must be true or false, got 'x'"),
    (dict(lean_memory='yes'), r"lean_memory must be true or false"),
    (dict(fold_teacher_bn=1), r'fold_teacher_bn must be true or false'),
    (dict(discriminator='x'), r"discriminator must be a mapping"),
    (dict(teacher_mode='joint', joint_step_order='teacher_first', teacher_optimizer=dict(lr=-1)),
     r'teacher_optimizer\.lr must be a finite number >= 0 .*got -1'),
    (dict(teacher_mode='joint', joint_step_order='teacher_first', teacher_optimizer=dict(lr=0.1, momentum=1.0)),
     r'teacher_optimizer\.momentum must be a finite number >= 0 and < 1'),
    (dict(teacher_mode='joint', joint_step_order='teacher_first', teacher_optimizer=dict(lr=0.1, milestones=[0.5])),
     r'teacher_optimizer\.milestones must be a list of epochs'),
])
def test_jointrd_settings_of_the_wrong_type_or_range_are_refused_by_name(fields, message):
    from jointrd_timm.methods import JointRDConfig
    with pytest.raises(ValueError, match=message):
        JointRDConfig.from_dict(fields)


def test_good_jointrd_settings_pass_unchanged_and_integers_count_as_numbers():
    from jointrd_timm.methods import JointRDConfig
    config = JointRDConfig.from_dict(dict(eta_min=1, eta_horizon=5, kd_weight=1, kd_temperature=2, hybrid_paths=2,
                                          lean_memory=False))
    assert (config.eta_min, config.kd_temperature, config.hybrid_paths, config.lean_memory) == (1, 2, 2, False)


def test_adversarial_methods_and_their_discriminator_sgd_refuse_bad_settings():
    from jointrd_timm.methods.adversarial import (AdversarialPortableStudent, ConditionalAdversarialKD,
                                                  DiscriminatorConfig)
    teacher = timm.create_model('resnet20_cifar', num_classes=10)
    student = timm.create_model('plain_resnet20_cifar', num_classes=10)
    with pytest.raises(ValueError, match=r'AdversarialPortableStudent: kd_temperature must be a finite number > 0'):
        AdversarialPortableStudent(student, teacher, kd_temperature=0)
    with pytest.raises(ValueError, match=r'AdversarialPortableStudent: hidden must be an integer >= 1'):
        AdversarialPortableStudent(student, teacher, hidden=0)
    with pytest.raises(ValueError, match=r'ConditionalAdversarialKD: dropout must be a finite number >= 0 and < 1'):
        ConditionalAdversarialKD(student, teacher, num_classes=10, dropout=1.0)
    with pytest.raises(ValueError, match=r'discriminator\.lr must be a finite number >= 0'):
        DiscriminatorConfig.from_dict(dict(lr=-0.1))
    assert DiscriminatorConfig.from_dict(dict(lr=0.0)).lr == 0.0  # a frozen discriminator, as lr 0 freezes the twin
    with pytest.raises(ValueError, match=r'discriminator\.cosine_epochs must be an integer >= 0'):
        DiscriminatorConfig.from_dict(dict(cosine_epochs=2.5))
    assert DiscriminatorConfig.from_dict(dict(lr=1e-3, milestones=[2, 4])).milestones == [2, 4]


def test_numpy_scalars_count_as_numbers_and_flags():
    import numpy as np
    from jointrd_timm.methods import JointRDConfig
    from jointrd_timm.methods.adversarial import DiscriminatorConfig
    config = JointRDConfig.from_dict(dict(kd_weight=np.float32(0.5), hybrid_paths=np.int64(2),
                                          lean_memory=np.bool_(True)))
    assert config.kd_weight == 0.5 and config.hybrid_paths == 2
    assert DiscriminatorConfig.from_dict(dict(cosine_epochs=np.int64(5), milestones=list(np.array([2, 4]))))
    assert DiscriminatorConfig.from_dict(dict(cosine_epochs=0)).cosine_epochs == 0  # 0: the milestones decide
