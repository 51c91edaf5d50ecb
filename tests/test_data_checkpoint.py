"""Data through HF datasets (image folder, Hub-layout parquet folder, held-out split) and safetensors checkpoints."""
import numpy as np
import pytest
import torch
from PIL import Image

from jointrd_timm.io import load_weights
from jointrd_timm.training.checkpoint import (CheckpointError, atomic_write, load_checkpoint, module_state,
                                             save_checkpoint)
from jointrd_timm.training.data import load_image_dataset


def _images(n, size=8):
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_image_folder(tmp_path):
    for c in range(3):
        (tmp_path / f'c{c}').mkdir()
        for i, img in enumerate(_images(2)):
            img.save(tmp_path / f'c{c}' / f'{i}.png')
    ds = load_image_dataset(str(tmp_path), 'train', transform='tensor', input_size=8, image_column='image')
    assert len(ds) == 6 and ds.num_classes == 3
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and y in (0, 1, 2)


def test_hub_layout_parquet_folder_and_heldout_split(tmp_path):
    import datasets
    features = datasets.Features({'picture': datasets.Image(), 'cls': datasets.ClassLabel(num_classes=4)})
    for split, n in (('train', 40), ('test', 8)):
        data = datasets.Dataset.from_dict({'picture': _images(n), 'cls': [i % 4 for i in range(n)]}, features=features)
        (tmp_path / 'data').mkdir(exist_ok=True)
        data.to_parquet(str(tmp_path / 'data' / f'{split}-00000-of-00001.parquet'))
    kwargs = dict(transform='cifar', input_size=8, image_column='picture', label_column='cls')
    test = load_image_dataset(str(tmp_path), 'test', **kwargs)
    assert len(test) == 8 and test[0][0].shape == (3, 8, 8)
    train = load_image_dataset(str(tmp_path), 'train', validation_fraction=0.25, part='train', **kwargs)
    val = load_image_dataset(str(tmp_path), 'train', validation_fraction=0.25, part='val', **kwargs)
    assert (len(train), len(val)) == (30, 10)
    as_bytes = lambda d: {d.data[i]['picture'].tobytes() for i in range(len(d))}  # noqa: E731
    assert not as_bytes(train) & as_bytes(val)  # disjoint
    again = load_image_dataset(str(tmp_path), 'train', validation_fraction=0.25, part='val', **kwargs)
    assert as_bytes(again) == as_bytes(val)  # deterministic
    with pytest.raises(ValueError, match='needs validation_fraction above 0'):
        load_image_dataset(str(tmp_path), 'train', part='val', **kwargs)
    with pytest.raises(ValueError, match=r'validation_fraction must be a number in \[0, 1\)'):
        load_image_dataset(str(tmp_path), 'train', part='val', validation_fraction=1, **kwargs)
    found = load_image_dataset(str(tmp_path), 'test', recipe='cifar', input_size=8)  # its one image / label column
    assert (found.image_column, found.label_column) == ('picture', 'cls') and found[0][0].shape == test[0][0].shape
    with pytest.raises(KeyError, match=r"no column 'img'"):
        load_image_dataset(str(tmp_path), 'train', recipe='cifar', image_column='img')


def _parquet(folder, labels):
    import datasets
    data = datasets.Dataset.from_dict({'img': _images(len(labels)), 'label': labels},
                                      features=datasets.Features({'img': datasets.Image(),
                                                                  'label': datasets.Value('int64')
                                                                  if all(isinstance(v, int) for v in labels)
                                                                  else datasets.Value('string')}))
    (folder / 'data').mkdir(parents=True, exist_ok=True)
    data.to_parquet(str(folder / 'data' / 'train-00000-of-00001.parquet'))
    return str(folder)


def test_plain_integer_labels_index_the_classes_of_the_whole_split_and_others_are_refused(tmp_path):
    from jointrd_timm.training.data import DatasetColumnError
    kwargs = dict(transform='tensor', input_size=8)
    # labels 1..3 (no 0): the model needs 4 outputs, not 3 (class 3 would be out of range)
    assert load_image_dataset(_parquet(tmp_path / 'a', [1, 2, 3, 1, 2, 3]), 'train', **kwargs).num_classes == 4
    # a limit that happens to drop the largest label does not shrink the classifier
    source = _parquet(tmp_path / 'b', [0, 1, 2, 0, 1, 2])
    limited = load_image_dataset(source, 'train', limit=2, **kwargs)
    assert len(limited) == 2 and limited.num_classes == 3
    for labels, shown in (([0, 1, -1], '-1'), (['cat', 'dog', 'cat'], "'cat'")):
        with pytest.raises(DatasetColumnError, match=rf"label column 'label' holds {shown}, not a class index .*"
                                                     r'class_encode_column'):
            load_image_dataset(_parquet(tmp_path / f'c{len(shown)}', labels), 'train', **kwargs)


def test_cifar_transform_reads_images_at_their_size_unchanged_and_resizes_to_another():
    from torchvision.transforms import functional as F
    from jointrd_timm.training.data import CIFAR_MEAN, CIFAR_STD, make_transform
    image = _images(1, size=32)[0]
    plain = F.normalize(F.to_tensor(image), CIFAR_MEAN, CIFAR_STD)
    assert torch.equal(make_transform('cifar', False, 32, CIFAR_MEAN, CIFAR_STD)(image), plain)  # 32 px as before
    torch.manual_seed(0)
    crops = [make_transform('cifar', True, 32, CIFAR_MEAN, CIFAR_STD)(image) for _ in range(8)]
    assert all(c.shape == (3, 32, 32) for c in crops) and any(not torch.equal(c, plain) for c in crops)
    for train in (False, True):  # a 32 px image read at 64 px: upsampled, then augmented at that size
        x = make_transform('cifar', train, 64, CIFAR_MEAN, CIFAR_STD)(image)
        assert x.shape == (3, 64, 64)
    wide = Image.fromarray(np.zeros((32, 48, 3), dtype=np.uint8))  # not square: resized and cropped square
    assert make_transform('cifar', False, 64, CIFAR_MEAN, CIFAR_STD)(wide).shape == (3, 64, 64)
    ramp = np.add.outer(np.arange(32), np.arange(32)).astype(np.uint8) * 4  # smooth: resizing keeps it
    smooth = Image.fromarray(np.stack([ramp, 255 - ramp, ramp // 2], axis=-1))
    plain = F.normalize(F.to_tensor(smooth), CIFAR_MEAN, CIFAR_STD)
    down = torch.nn.functional.avg_pool2d(make_transform('cifar', False, 64, CIFAR_MEAN, CIFAR_STD)(smooth), 2)
    assert (down - plain).abs().max() < 0.05 * plain.abs().max()  # the same picture, twice the size


def test_tensor_transform_gives_square_inputs_of_the_size_asked_and_keeps_a_square_image_exact():
    from torchvision.transforms import functional as F
    from jointrd_timm.training.data import make_transform
    mean, std = (0.5,) * 3, (0.5,) * 3
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, 6:34] = 255  # the centre square (and a margin) is white, the sides black
    for train in (False, True):
        x = make_transform('tensor', train, 16, mean, std)(Image.fromarray(wide))
        assert x.shape == (3, 16, 16) and torch.all(x == 1.0)  # resized to 16 x 32, its centre 16 x 16 kept
    image = _images(1, size=16)[0]
    assert torch.equal(make_transform('tensor', False, 16, mean, std)(image), F.normalize(F.to_tensor(image), mean, std))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_image_dataset(str(tmp_path / 'nope'), 'train')


def test_checkpoint_roundtrip_restores_optimizer_scheduler_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        sched.step()
    side = torch.nn.Linear(2, 2)  # a side module (a weight average): saved beside the model, not in it
    path = save_checkpoint(tmp_path / 'c.safetensors', model, epoch=2, optimizers={'model': opt},
                           schedulers={'model': sched}, extra={'note': 'x'}, modules={'ema': side})
    expected_next = torch.rand(3)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.MultiStepLR(opt2, milestones=[2], gamma=0.1)
    state = load_checkpoint(path, model2, {'model': opt2}, {'model': sched2})
    assert (state['epoch'], state['extra'], set(state['modules'])) == (2, {'note': 'x'}, {'ema'})
    side_state = module_state(path, state, 'ema')
    assert set(side_state) == {'weight', 'bias'} and torch.equal(side_state['weight'], side.weight.detach())
    with pytest.raises(CheckpointError, match="holds no state for 'teacher' \\(it holds \\['ema'\\]\\)"):
        module_state(path, state, 'teacher')
    assert torch.equal(torch.rand(3), expected_next)  # RNG restored to the save point
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]['lr'] == pytest.approx(0.01) and sched2.last_epoch == 3
    for p, q in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(p['momentum_buffer'], q['momentum_buffer'])


def test_checkpoint_keeps_each_gpus_rng_state_once_cuda_is_in_use(tmp_path, monkeypatch):
    """Dropout and drop-path on a GPU draw from its own generator: saved per device, restored when the same number
    of devices is there (this machine has none: torch.cuda's calls are stood in for)."""
    states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5, 6], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: states)
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', restored.extend)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    model = torch.nn.Linear(2, 2)
    path = save_checkpoint(tmp_path / 'c.safetensors', model, epoch=1)
    load_checkpoint(path, torch.nn.Linear(2, 2))
    assert len(restored) == 2 and all(torch.equal(a, b) for a, b in zip(restored, states))
    restored.clear()
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)  # another machine: the CPU state only
    load_checkpoint(path, torch.nn.Linear(2, 2))
    assert restored == []


def test_atomic_write_leaves_nothing_half_written(tmp_path):
    target = tmp_path / 'w.safetensors'
    target.write_bytes(b'old')

    def fails(tmp):
        tmp.write_bytes(b'partial')
        raise OSError('disk full')
    with pytest.raises(OSError):
        atomic_write(target, fails)
    assert target.read_bytes() == b'old' and list(tmp_path.iterdir()) == [target]


def test_weights_errors(tmp_path):
    model = torch.nn.Linear(4, 3)
    (tmp_path / 'w.bin').write_bytes(b'pickle')
    with pytest.raises(CheckpointError, match='pickle'):
        load_weights(model, tmp_path / 'w.bin')
    with pytest.raises(CheckpointError, match='No checkpoint at'):
        load_weights(model, tmp_path / 'missing.safetensors')
    from safetensors.torch import save_file
    save_file({'weight': torch.zeros(3, 4), 'bias': torch.zeros(3)}, str(tmp_path / 'ok.safetensors'))
    data = (tmp_path / 'ok.safetensors').read_bytes()
    (tmp_path / 'cut.safetensors').write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_weights(model, tmp_path / 'cut.safetensors')
    with pytest.raises(CheckpointError, match=r'does not match Linear: .*mis-shaped'):
        load_weights(torch.nn.Linear(5, 3), tmp_path / 'ok.safetensors')
    load_weights(model, tmp_path / 'ok.safetensors')
    assert not model.weight.any()


def test_weight_loading_lives_in_io_and_the_checkpoint_path_is_a_deprecated_alias():
    from jointrd_timm import io
    from jointrd_timm.training import checkpoint
    for name in ('load_weights', 'read_state_dict'):
        with pytest.warns(DeprecationWarning, match=f'checkpoint.{name} is deprecated: import it from jointrd_timm.io'):
            assert getattr(checkpoint, name) is getattr(io, name)
    with pytest.raises(AttributeError):
        checkpoint.no_such_name  # noqa: B018


@pytest.mark.parametrize('kwargs, message', [
    (dict(source='sklearn:digits', split='val'), "splits train and test, not 'val'"),
    (dict(source='sklearn:digits', split='train', transform='jitter'), "Unknown transform 'jitter'"),
    (dict(source='sklearn:digits', split='train', part='half'), "part must be 'all', 'train', 'val' or 'test'"),
    (dict(source='sklearn:digits', split='train', part='val'), 'needs validation_fraction above 0'),
    (dict(source='sklearn:digits', split='train', channels=2), 'channels must be 1 or 3, got 2'),
])
def test_rejected_dataset_arguments_are_input_errors(kwargs, message):
    """What the CLI prints as one line (a JointRDError), and still a ValueError for older callers."""
    from jointrd_timm.errors import InputError
    with pytest.raises(InputError, match=message) as caught:
        load_image_dataset(**kwargs)
    assert isinstance(caught.value, ValueError)


def _class_folders(root, classes=3, per_class=10):
    """A folder of class subfolders alone (no train/ or test/): datasets reads it as one train split."""
    rng = np.random.RandomState(1)
    for c in range(classes):
        (root / f'c{c}').mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.randint(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / f'c{c}' / f'{i}.png')
    return root


def test_a_test_set_is_carved_from_data_without_one_apart_from_train_and_val(tmp_path):
    root = _class_folders(tmp_path / 'photos')
    kwargs = dict(transform='tensor', input_size=8, test_fraction=0.2)
    parts = {part: load_image_dataset(str(root), 'train', part=part, validation_fraction=0.25, **kwargs)
             for part in ('train', 'val', 'test')}
    assert {k: len(v) for k, v in parts.items()} == dict(train=18, val=6, test=6)  # 30 images: 6 test, then 24 / 4
    pixels = {k: {v.data[i]['image'].tobytes() for i in range(len(v))} for k, v in parts.items()}
    assert len(pixels['train'] | pixels['val'] | pixels['test']) == 30  # disjoint and covering the split
    assert all(v.num_classes == 3 for v in parts.values())  # the classes of the whole split
    again = load_image_dataset(str(root), 'train', part='test', **kwargs)
    assert {again.data[i]['image'].tobytes() for i in range(len(again))} == pixels['test']  # seeded
    # without a validation carve, train is all but the test set
    assert len(load_image_dataset(str(root), 'train', part='train', **kwargs)) == 24
    with pytest.raises(ValueError, match='needs test_fraction above 0'):
        load_image_dataset(str(root), 'train', part='test', transform='tensor', input_size=8)
    with pytest.raises(ValueError, match=r'test_fraction must be a number in \[0, 1\)'):
        load_image_dataset(str(root), 'train', part='test', transform='tensor', input_size=8, test_fraction=1.0)
    with pytest.raises(ValueError, match=r"has no split 'test'.*--test-fraction"):
        load_image_dataset(str(root), 'test', transform='tensor', input_size=8)
    with pytest.raises(ValueError, match="test_fraction carves the split in parts"):
        load_image_dataset(str(root), 'train', transform='tensor', input_size=8, test_fraction=0.2)
    with pytest.raises(ValueError, match=r"cannot carve 0.99 of its 30 images"):  # nothing left to train on
        load_image_dataset(str(root), 'train', part='train', transform='tensor', input_size=8, test_fraction=0.99)


def test_wide_grey_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    """A 16-bit PNG (PIL mode I;16) read through an image folder: PIL's convert would clip every value above 255
    (an almost white image); it is scaled to 8 bits instead, in grey and in RGB."""
    from jointrd_timm.training.data import to_mode
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000
    for c in ('a', 'b'):
        (tmp_path / c).mkdir()
        Image.fromarray(ramp).save(tmp_path / c / '0.png')
    expected = np.rint(ramp / 257.0)
    for channels in (1, 3):
        ds = load_image_dataset(str(tmp_path), 'train', transform='tensor', input_size=8, channels=channels,
                                mean=(0.0,) * channels, std=(1.0,) * channels)
        x, _ = ds[0]
        assert ds.data[0]['image'].mode in ('I;16', 'I')
        assert np.allclose(x[0].numpy() * 255, expected, atol=0.51) and x.shape == (channels, 8, 8)
    as_float = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32), 'F')
    assert np.asarray(to_mode(as_float, 'L')).tolist() == [[128, 128], [128, 128]]  # floats in [0, 1]
    # 32-bit integers (how PIL opens some 16-bit PNGs) are 16-bit values, whatever one image's largest value
    dark = Image.fromarray(np.array([[0, 257 * 200]], dtype=np.int32), 'I')
    assert np.asarray(to_mode(dark, 'L')).tolist() == [[0, 200]]


def test_class_folders_with_subfolders_keep_their_classes(tmp_path):
    """cat/indoor, cat/outdoor, dog/indoor, dog/park: datasets' imagefolder would name the classes indoor / outdoor
    / park (cat/indoor and dog/indoor one class); the class folders are the classes, their images at any depth, with
    the same label index in the train and test split folders (test lacks a class here)."""
    def draw(folder, shade, n=2):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new('RGB', (8, 8), (shade, i, 0)).save(folder / f'{shade}-{i}.png')

    flat = tmp_path / 'one'
    for name, shade in (('cat/indoor', 10), ('cat/outdoor', 20), ('dog/indoor', 30), ('dog/park', 40)):
        draw(flat / name, shade)
    draw(flat / 'dog', 50, n=1)  # an image beside the subfolders belongs to the class too
    ds = load_image_dataset(str(flat), 'train', transform='tensor', input_size=8)
    assert ds.data.features['label'].names == ['cat', 'dog'] and len(ds) == 9
    shades = {ds.data[i]['image'].getpixel((0, 0))[0]: ds.data[i]['label'] for i in range(len(ds))}
    assert shades == {10: 0, 20: 0, 30: 1, 40: 1, 50: 1}
    split = tmp_path / 'two'
    for name, shade in (('train/bird/a', 1), ('train/cat/a', 2), ('train/dog/b', 3), ('test/cat/x', 4),
                        ('test/dog/y', 5)):
        draw(split / name, shade)
    train = load_image_dataset(str(split), 'train', transform='tensor', input_size=8)
    test = load_image_dataset(str(split), 'test', transform='tensor', input_size=8)
    assert train.data.features['label'].names == test.data.features['label'].names == ['bird', 'cat', 'dog']
    assert sorted(test.data['label']) == [1, 1, 2, 2] and train.num_classes == test.num_classes == 3
    plain = tmp_path / 'flat'  # no subfolders: datasets' own imagefolder, as before
    for name, shade in (('a', 1), ('b', 2)):
        draw(plain / name, shade)
    flat_set = load_image_dataset(str(plain), 'train', transform='tensor', input_size=8)
    assert flat_set.data.features['label'].names == ['a', 'b']
    # timm's validate.py reads a folder through datasets: it labels the flat one as we do, not the nested ones
    from jointrd_timm.training.data import labelled_as_datasets_labels_it
    assert labelled_as_datasets_labels_it(flat_set.data)
    assert not labelled_as_datasets_labels_it(ds.data) and not labelled_as_datasets_labels_it(test.data)


def test_split_folders_are_named_as_datasets_names_them_and_flat_ones_stay_with_datasets(tmp_path):
    import os

    def draw(folder, shade, n=2):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new('RGB', (8, 8), (shade, i, 0)).save(folder / f'{shade}-{i}.png')

    flat = tmp_path / 'flat'  # seg_train / seg_test are split folders to datasets: classes cat and dog, not the splits
    for name, shade in (('seg_train/cat', 1), ('seg_train/dog', 2), ('seg_test/cat', 3), ('seg_test/dog', 4)):
        draw(flat / name, shade)
    train = load_image_dataset(str(flat), 'train', transform='tensor', input_size=8)
    assert train.data.features['label'].names == ['cat', 'dog'] and len(train) == 4
    nested = tmp_path / 'nested'  # val/ is the validation split; a symlinked subfolder is followed
    for name, shade in (('training/cat/a', 1), ('training/dog/b', 2), ('val/cat/c', 3), ('val/dog/d', 4)):
        draw(nested / name, shade)
    draw(tmp_path / 'elsewhere', 5)
    os.symlink(tmp_path / 'elsewhere', nested / 'training' / 'cat' / 'linked')
    (nested / 'training' / 'cat' / 'a' / 'notes.txt').write_text('not an image')
    train = load_image_dataset(str(nested), 'train', transform='tensor', input_size=8)
    assert train.data.features['label'].names == ['cat', 'dog']
    assert sorted(train.data[i]['image'].getpixel((0, 0))[0] for i in range(len(train))) == [1, 1, 2, 2, 5, 5]
    for name in ('validation', 'val'):
        val = load_image_dataset(str(nested), name, transform='tensor', input_size=8)
        assert sorted(val.data['label']) == [0, 0, 1, 1]


def test_folders_saved_by_save_to_disk_load_by_split(tmp_path):
    import datasets

    from jointrd_timm.errors import InputError
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(num_classes=3)})
    splits = {split: datasets.Dataset.from_dict({'image': _images(n), 'label': [i % 3 for i in range(n)]},
                                                features=features, split=split)
              for split, n in (('train', 9), ('test', 6))}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / 'dict'))
    splits['test'].save_to_disk(str(tmp_path / 'one'))
    for source, split, n in ((tmp_path / 'dict', 'train', 9), (tmp_path / 'dict', 'test', 6),
                             (tmp_path / 'one', 'test', 6)):
        ds = load_image_dataset(str(source), split, transform='tensor', input_size=8)
        assert len(ds) == n and ds.num_classes == 3
        assert [ds[i][1] for i in range(n)] == [i % 3 for i in range(n)]
    with pytest.raises(InputError, match=r"one dataset saved by save_to_disk, its 'test' split, so it has no split "
                                         r"'train'.*--train-split test --test-fraction"):
        load_image_dataset(str(tmp_path / 'one'), 'train')
    sliced = datasets.Dataset.from_dict({'image': _images(4), 'label': [0, 1, 2, 0]}, features=features,
                                        split='train[:4]')
    sliced.save_to_disk(str(tmp_path / 'sliced'))  # a slice of train is read as train
    assert len(load_image_dataset(str(tmp_path / 'sliced'), 'train', transform='tensor', input_size=8)) == 4
    with pytest.raises(InputError, match=r"has no split 'validation'; its splits: \['test', 'train'\]"):
        load_image_dataset(str(tmp_path / 'dict'), 'validation')


def test_a_name_that_is_neither_a_folder_nor_a_reachable_hub_dataset_is_one_input_error(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    from jointrd_timm.errors import InputError
    # offline, as this machine is: read when the libraries are imported, so set where they keep it
    monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', tmp_path / 'hf')
    monkeypatch.chdir(tmp_path)
    with pytest.raises((InputError, FileNotFoundError), match=r'data/nonexist'):
        load_image_dataset('data/nonexist', 'test')


def test_a_missing_split_of_an_image_folder_with_split_folders_gets_no_train_only_hint(tmp_path):
    from jointrd_timm.errors import InputError
    for split in ('train', 'test'):
        for c in range(2):
            (tmp_path / split / f'c{c}').mkdir(parents=True)
            for i, img in enumerate(_images(2)):
                img.save(tmp_path / split / f'c{c}' / f'{i}.png')
    with pytest.raises(InputError, match=r"has no split 'validation'") as refused:
        load_image_dataset(str(tmp_path), 'validation')
    assert 'class subfolders alone has only a train split' not in str(refused.value)
    assert 'jointrd eval --split' in str(refused.value)


def test_the_digits_are_built_once_and_a_limited_or_carved_load_leaves_the_next_load_whole():
    """sklearn:digits is built once per process: what one load takes from it (a limit, a carved test set) must not
    change what the next load gets."""
    kwargs = dict(transform='tensor', input_size=8, channels=1)
    first = load_image_dataset('sklearn:digits', 'train', limit=16, **kwargs)
    carved = load_image_dataset('sklearn:digits', 'train', test_fraction=0.25, part='test', **kwargs)
    whole = load_image_dataset('sklearn:digits', 'train', **kwargs)
    again = load_image_dataset('sklearn:digits', 'train', limit=16, **kwargs)
    assert (len(first), len(carved), len(whole)) == (16, 360, 1437)
    assert whole.data is not first.data and whole.num_classes == 10
    assert all(torch.equal(first[i][0], again[i][0]) and first[i][1] == again[i][1] for i in range(16))
