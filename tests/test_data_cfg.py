"""How a run read its test images, said as timm's data config: read back from a transform, written to the saved
model's config.json, and followed by `jointrd eval` (and timm's validate.py) by default."""
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision import transforms as T
from torchvision.transforms import v2

from jointrd_timm.cli import main
from jointrd_timm.errors import InputError
from jointrd_timm.integrations.hub import save_trained_model
from jointrd_timm.training import data
from jointrd_timm.training.data import (IMAGENET_MEAN, IMAGENET_STD, _crop_pct, dataset_data_cfg, eval_transform,
                                        load_image_dataset, make_transform, transform_data_cfg)


def images(seed=0):
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 48), (61, 37), (32, 32))]


@pytest.mark.parametrize('transform', [
    make_transform('cifar', False, 32, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)),
    make_transform('tensor', False, 24, IMAGENET_MEAN, IMAGENET_STD),
    make_transform('imagenet', False, 32, IMAGENET_MEAN, IMAGENET_STD),
    timm.data.create_transform(40, crop_pct=0.9, interpolation='bicubic', mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.3)),
    timm.data.create_transform(28, crop_pct=0.95, interpolation='nearest'),
    T.Compose([T.Resize(45), T.CenterCrop((33, 33)), T.PILToTensor(), T.ConvertImageDtype(torch.float),
               T.Normalize([0.1, 0.2, 0.3], [1.0, 2.0, 3.0])]),
    v2.Compose([v2.Resize(40, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(36), v2.PILToTensor(),
                v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5, 0.4, 0.3], [0.2, 0.3, 0.4])]),
], ids=['cifar', 'tensor', 'imagenet-32', 'timm-bicubic-0.9', 'timm-nearest-0.95', 'pil-to-tensor', 'v2'])
def test_data_cfg_of_an_eval_transform_gives_the_same_tensors_through_timm(transform):
    cfg = transform_data_cfg(transform)
    assert cfg is not None and cfg['input_size'][0] == 3
    again = eval_transform(cfg)
    for image in images():
        if isinstance(transform, v2.Compose):  # v2 scales to [0, 1] by a product, ToTensor by a division
            assert torch.allclose(again(image), transform(image), rtol=0, atol=1e-6)
        else:
            assert torch.equal(again(image), transform(image))
    crop, resize = (next(t for t in transform.transforms if type(t).__name__ == name) for name in ('CenterCrop', 'Resize'))
    assert cfg['input_size'][1:] == tuple(crop.size) and cfg['interpolation'] == resize.interpolation.value


def test_data_cfg_values_and_channels():
    cfg = transform_data_cfg(make_transform('imagenet', False, 32, IMAGENET_MEAN, IMAGENET_STD), channels=1)
    assert cfg['input_size'] == (1, 32, 32) and cfg['crop_pct'] == 0.88  # resize 36: the fewest decimals that say it
    assert (cfg['mean'], cfg['std']) == (IMAGENET_MEAN, IMAGENET_STD)  # timm's float32 tensors, read back exactly
    assert transform_data_cfg(make_transform('cifar', False, 32, (0.5,), (0.5,)))['crop_pct'] == 1.0


def test_crop_pct_reads_back_to_the_same_resize():
    for resize in range(1, 300):
        for crop in range(1, resize + 1):
            pct = _crop_pct(crop, resize)
            assert math.floor(crop / pct) == resize, (crop, resize, pct)
    assert (_crop_pct(224, 256), _crop_pct(32, 36), _crop_pct(224, 235)) == (0.875, 0.88, 0.95)


@pytest.mark.parametrize('transform', [
    make_transform('cifar', True, 32, (0.5,) * 3, (0.5,) * 3),            # augmentation
    T.Compose([T.Resize((32, 40)), T.ToTensor(), T.Normalize((0.5,), (0.5,))]),   # a fixed non-square shape
    T.Compose([T.Resize(32), T.ToTensor(), T.Normalize((0.5,), (0.5,))]),        # no crop: the image's aspect
    T.Compose([T.Resize(36), T.CenterCrop(32), T.ToTensor()]),                    # no normalisation
    T.Compose([T.CenterCrop(32), T.Resize(36), T.ToTensor(), T.Normalize((0.5,), (0.5,))]),  # crop first
    T.Compose([T.Resize(30), T.CenterCrop(32), T.ToTensor(), T.Normalize((0.5,), (0.5,))]),  # the crop pads
    T.Compose([T.Resize(36), T.Pad(2), T.CenterCrop(32), T.ToTensor(), T.Normalize((0.5,), (0.5,))]),
    T.Compose([T.Resize(36, max_size=40), T.CenterCrop(32), T.ToTensor(), T.Normalize((0.5,), (0.5,))]),
    T.Compose([T.Resize(36), T.CenterCrop((32, 30)), T.ToTensor(), T.Normalize((0.5,), (0.5,))]),
    T.Compose([T.PILToTensor(), T.Resize(36), T.CenterCrop(32), T.ConvertImageDtype(torch.float),
               T.Normalize((0.5,), (0.5,))]),  # a tensor resize is not the PIL resize timm's transform makes
    v2.Compose([v2.Resize(36), v2.CenterCrop(32), v2.PILToTensor(), v2.ToDtype(torch.float32),
                v2.Normalize([0.5] * 3, [0.5] * 3)]),  # 0..255, not [0, 1], normalised
], ids=['train', 'squash', 'no-crop', 'no-normalize', 'crop-first', 'pads', 'pad', 'max-size', 'non-square-crop',
        'tensor-resize', 'unscaled'])
def test_pipelines_a_data_cfg_cannot_say_give_none(transform):
    assert transform_data_cfg(transform) is None


def test_dataset_data_cfg_finds_the_transform_of_a_wrapped_dataset(tmp_path):
    folder = image_folder(tmp_path)
    test = load_image_dataset(str(folder), 'test', transform='imagenet', input_size=24, image_column='image')
    expected = transform_data_cfg(test.transform)
    assert dataset_data_cfg(Subset(Subset(test, [0, 1]), [0])) == expected and expected['input_size'] == (3, 24, 24)
    assert dataset_data_cfg(torch.utils.data.TensorDataset(torch.zeros(2, 3))) is None


def image_folder(tmp_path, classes=3):
    rng = np.random.RandomState(0)
    for split in ('train', 'test'):
        for label in range(classes):
            folder = tmp_path / 'images' / split / f'class{label}'
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.randint(0, 256, (30 + 7 * i, 44, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    return tmp_path / 'images'


def test_load_image_dataset_reads_as_a_data_cfg_says_and_only_for_evaluation(tmp_path):
    folder = image_folder(tmp_path)
    cfg = dict(input_size=(3, 20, 20), crop_pct=0.8, interpolation='bicubic', mean=(0.3, 0.3, 0.3), std=(0.2,) * 3)
    test = load_image_dataset(str(folder), 'test', image_column='image', data_cfg=cfg)
    for index in range(len(test)):
        image = test.data[index]['image'].convert('RGB')
        assert torch.equal(test[index][0], eval_transform(cfg)(image)) and test[index][0].shape == (3, 20, 20)
    with pytest.raises(InputError, match='data_cfg gives an evaluation transform'):
        load_image_dataset(str(folder), 'train', image_column='image', data_cfg=cfg)


def test_eval_reads_as_the_saved_model_config_says_by_default(tmp_path, monkeypatch, capsys):
    """A model saved with how its test images were read (24 px, ImageNet's eval crop and statistics) is evaluated
    so by default, bit for bit as they were read; --transform and --input-size still choose."""
    folder = image_folder(tmp_path)
    test = load_image_dataset(str(folder), 'test', transform='imagenet', input_size=24, image_column='image')
    torch.manual_seed(0)
    model = timm.create_model('plain_resnet20_cifar', num_classes=3).eval()
    saved = save_trained_model(model, tmp_path / 'model', data_cfg=dataset_data_cfg(test))
    assert main(['eval', str(saved), '--dataset', str(folder), '--image-column', 'image']) == 0
    from jointrd_timm.io import top1_accuracy
    expected = top1_accuracy(model, test, 8)
    assert f'top-1 {expected:.2f} % on 6 images' in capsys.readouterr().out
    seen = {}

    def fake_evaluate(model, dataset, split, **kwargs):
        seen.clear()
        seen.update(kwargs)
        return dict(top1=50.0, samples=2)
    monkeypatch.setattr(data, 'evaluate_model', fake_evaluate)
    main(['eval', str(saved), '--dataset', str(folder), '--input-size', '48'])
    assert seen['data_cfg']['input_size'] == (3, 48, 48) and seen['data_cfg']['crop_pct'] == 0.88
    main(['eval', str(saved), '--dataset', str(folder), '--transform', 'cifar'])
    assert seen['transform'] == 'cifar' and 'data_cfg' not in seen


def _varied_model(seed: int, images):
    """plain_resnet20_cifar whose random classifier is centred on the mean feature of ``images`` (a dataset of
    (image, label)), so that its class varies from image to image instead of being one class for all."""
    torch.manual_seed(seed)
    model = timm.create_model('plain_resnet20_cifar', num_classes=3).eval()
    with torch.no_grad():
        features = torch.stack([model.forward_head(model.forward_features(x[None]), pre_logits=True)[0]
                                for x, _ in images])
        model.fc.bias.copy_(-model.fc.weight @ features.mean(0))
    return model


def test_eval_against_a_second_model_reads_the_same_images_as_each_model_reads_them(tmp_path, capsys):
    """--against: the second model's top-1 on the same images, each read as its own config says (here 24 px with
    ImageNet's crop for one, 16 px for the other), and the share of images on which the two give the same class."""
    folder = image_folder(tmp_path, classes=3)
    reads = [load_image_dataset(str(folder), 'test', transform='imagenet', input_size=size, image_column='image')
             for size in (24, 16)]
    models = [_varied_model(seed, test) for seed, test in zip((0, 5), reads)]
    saved = [save_trained_model(m, tmp_path / f'model{k}', data_cfg=dataset_data_cfg(test))
             for k, (m, test) in enumerate(zip(models, reads))]
    classes = [[int(m(x[None]).argmax()) for x, _ in test] for m, test in zip(models, reads)]
    misread = [int(models[1](x[None]).argmax()) for x, _ in reads[0]]  # the second model at the first one's size
    same = 100 * sum(a == b for a, b in zip(*classes)) / len(classes[0])
    # the models' classes vary, and reading the second one at the first one's size would give another agreement
    assert len(set(classes[0])) > 1 and len(set(classes[1])) > 1
    assert same != 100 * sum(a == b for a, b in zip(classes[0], misread)) / len(misread)
    from jointrd_timm.io import top1_accuracy
    assert main(['eval', str(saved[0]), '--dataset', str(folder), '--image-column', 'image',
                 '--against', str(saved[1])]) == 0
    out = capsys.readouterr().out
    assert f'top-1 {top1_accuracy(models[0], reads[0], 8):.2f} % on 6 images' in out
    assert (f'{saved[1]}: top-1 {top1_accuracy(models[1], reads[1], 8):.2f} % on the same images; the two give the '
            f'same class on {same:.2f} % of them') in out
    # a second model that cannot be loaded is refused before anything is evaluated
    assert main(['eval', str(saved[0]), '--dataset', str(folder), '--image-column', 'image',
                 '--against', str(tmp_path / 'absent')]) == 1
    captured = capsys.readouterr()
    assert captured.out == '' and 'No folder' in captured.err


def test_eval_against_compares_classes_by_name_where_both_models_name_them(tmp_path, capsys):
    """The same model saved twice, the second listing its classes in another order (its classifier rows permuted to
    match): it gives the same class on every image, though not the same output index."""
    folder = image_folder(tmp_path, classes=3)
    test = load_image_dataset(str(folder), 'test', transform='imagenet', input_size=24, image_column='image')
    model = _varied_model(0, test)
    names = ['class0', 'class1', 'class2']
    order = [2, 0, 1]  # output k of the permuted model is class order[k]
    permuted = _varied_model(0, test)
    with torch.no_grad():
        permuted.fc.weight.copy_(model.fc.weight[order])
        permuted.fc.bias.copy_(model.fc.bias[order])
    first = save_trained_model(model, tmp_path / 'first', data_cfg=dataset_data_cfg(test), label_names=names)
    second = save_trained_model(permuted, tmp_path / 'second', data_cfg=dataset_data_cfg(test),
                                label_names=[names[k] for k in order])
    indices = [(int(model(x[None]).argmax()), int(permuted(x[None]).argmax())) for x, _ in test]
    assert len({a for a, _ in indices}) > 1  # its class varies from image to image
    assert all(order[b] == a for a, b in indices) and any(a != b for a, b in indices)  # the same classes, moved
    assert main(['eval', str(first), '--dataset', str(folder), '--image-column', 'image',
                 '--against', str(second)]) == 0
    captured = capsys.readouterr()
    assert 'the two give the same class on 100.00 % of them' in captured.out
    assert 'list their classes differently: compared by class name' in captured.err
    # without names on one side, output i is output i, and the note says it was not checked
    bare = save_trained_model(permuted, tmp_path / 'bare', data_cfg=dataset_data_cfg(test))
    assert main(['eval', str(first), '--dataset', str(folder), '--image-column', 'image', '--against', str(bare)]) == 0
    captured = capsys.readouterr()
    same = 100 * sum(a == b for a, b in indices) / len(indices)
    assert f'the two give the same class on {same:.2f} % of them' in captured.out
    assert 'only one of them names its classes, so output i of one is taken as output i of the other' in captured.err
    from jointrd_timm.io import top1_agreement
    with pytest.raises(ValueError, match=r'on the same images: got \(2,\) and \(1,\)'):
        top1_agreement(torch.tensor([1, 2]), torch.tensor([1]))  # would broadcast to a share above 100 %


@pytest.mark.parametrize('crop_mode,input_size', [('squash', (3, 20, 20)), ('border', (3, 20, 20)),
                                                  ('center', (3, 18, 22))])
def test_a_test_set_read_as_a_teachers_config_says_is_saved_so_whatever_its_crop(tmp_path, crop_mode, input_size):
    """A teacher whose weights expect a 'squash' or 'border' crop (or a non-square input): the test set read so
    records that config whole, and the model saved from the run is read back by it, tensor for tensor."""
    folder = image_folder(tmp_path)
    cfg = dict(input_size=input_size, crop_pct=0.9, crop_mode=crop_mode, interpolation='bicubic',
               mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3))
    test = load_image_dataset(str(folder), 'test', image_column='image', data_cfg=cfg)
    assert dataset_data_cfg(Subset(test, [0, 1])) == cfg
    model = timm.create_model('resnet18', num_classes=3)
    saved = save_trained_model(model, tmp_path / 'hub', data_cfg=dataset_data_cfg(test))
    reread = timm.create_model(f'local-dir:{saved}', pretrained=True)
    again = eval_transform(timm.data.resolve_data_config({}, model=reread))
    for index in range(len(test)):
        assert torch.equal(again(test.data[index]['image'].convert('RGB')), test[index][0])


def test_a_centre_crop_read_from_its_steps_says_so_over_an_architectures_squash(tmp_path):
    """A pipeline read back from its steps is a centre crop: saved over an architecture whose config says 'squash'
    (timm's vit_small_patch16_384-style configs), the saved config says 'center', so it is read back as it was."""
    transform = make_transform('imagenet', False, 32, IMAGENET_MEAN, IMAGENET_STD)
    assert transform_data_cfg(transform)['crop_mode'] == 'center'
    model = timm.create_model('resnet18', num_classes=3, pretrained_cfg_overlay=dict(crop_mode='squash'))
    saved = save_trained_model(model, tmp_path / 'hub', data_cfg=transform_data_cfg(transform))
    again = eval_transform(timm.data.resolve_data_config({}, model=timm.create_model(f'local-dir:{saved}',
                                                                                     pretrained=True)))
    for image in images():
        assert torch.equal(again(image), transform(image))


def test_a_partial_data_cfg_is_recorded_with_the_defaults_timm_applied(tmp_path):
    """A config that leaves the crop, interpolation or statistics out (a YAML's data_cfg, an integer size) is
    recorded as timm applied it, so a saved model is read back the same over any architecture's defaults."""
    transform = eval_transform(dict(input_size=30, mean=(0.5, 0.5, 0.5)))
    cfg = transform_data_cfg(transform)
    assert cfg == dict(input_size=(3, 30, 30), interpolation='bilinear', crop_pct=timm.data.DEFAULT_CROP_PCT,
                       crop_mode='center', mean=(0.5, 0.5, 0.5), std=timm.data.IMAGENET_DEFAULT_STD)
    model = timm.create_model('resnet18', num_classes=3, pretrained_cfg_overlay=dict(
        crop_pct=0.95, interpolation='bicubic', crop_mode='squash'))
    saved = save_trained_model(model, tmp_path / 'hub', data_cfg=cfg)
    again = eval_transform(timm.data.resolve_data_config({}, model=timm.create_model(f'local-dir:{saved}',
                                                                                     pretrained=True)))
    for image in images():
        assert torch.equal(again(image), transform(image))
