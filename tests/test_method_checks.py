"""The methods refuse a teacher and a twin that disagree on classes or input channels, in their constructors (the
plain-PyTorch API), with the same message as the YAML factory."""
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
