"""The data's image and label columns are found when not named (data.find_columns), and named ones are checked."""
import datasets
import numpy as np
import pytest
from PIL import Image

from jointrd_timm.training.data import DatasetColumnError, find_columns, load_image_dataset
from jointrd_timm.training.distill import DistillError, plan_distill


def _images(n, size=8, mode='RGB'):
    rng = np.random.RandomState(0)
    shape = (size, size, 3) if mode == 'RGB' else (size, size + 4)  # grey ones are not square
    return [Image.fromarray(rng.randint(0, 255, shape, dtype=np.uint8), mode) for _ in range(n)]


def _table(columns):
    """A datasets.Dataset of 6 rows with the given {name: feature} columns (images, class labels, strings, ints)."""
    values = {}
    for name, feature in columns.items():
        if isinstance(feature, datasets.Image):
            values[name] = _images(6)
        elif isinstance(feature, datasets.ClassLabel):
            values[name] = [i % feature.num_classes for i in range(6)]
        elif feature.dtype == 'string':
            values[name] = [f'row {i}' for i in range(6)]
        else:
            values[name] = [i % 3 for i in range(6)]
    return datasets.Dataset.from_dict(values, features=datasets.Features(columns))


def _image_folder(root, mode='RGB'):
    for split, n in (('train', 4), ('test', 2)):
        for c in ('cat', 'dog', 'emu'):
            (root / split / c).mkdir(parents=True)
            for i, img in enumerate(_images(n, mode=mode)):
                img.save(root / split / c / f'{i}.png')
    return root


IMAGE, LABEL = datasets.Image(), datasets.ClassLabel(num_classes=3)


@pytest.mark.parametrize('columns, found', [
    (dict(img=IMAGE, label=LABEL), ('img', 'label')),                        # CIFAR-10 on the Hub
    (dict(image=IMAGE, label=LABEL), ('image', 'label')),                    # an image folder
    (dict(pixels=IMAGE, fine=LABEL, note=datasets.Value('string')), ('pixels', 'fine')),
    (dict(label=datasets.Value('int64'), photo=IMAGE, kind=LABEL), ('photo', 'label')),  # 'label' comes first
])
def test_columns_are_found_by_their_type(columns, found):
    assert find_columns(_table(columns), None, None, 'data') == found


@pytest.mark.parametrize('columns, given, message', [
    (dict(a=IMAGE, b=IMAGE, label=LABEL), (None, None),
     r"data: has 2 columns of images; its columns are: a \(Image\), b \(Image\), label \(ClassLabel\)\. "
     r'Set image_column to the right one'),
    (dict(caption=datasets.Value('string'), label=LABEL), (None, None),
     r'data: has no column of images; its columns are: caption \(Value\), label \(ClassLabel\)\. Set image_column'),
    (dict(img=IMAGE, fine_label=LABEL, coarse_label=datasets.ClassLabel(num_classes=2)), (None, None),
     r"data: has no column \"label\" and 2 class-label columns \['fine_label', 'coarse_label'\].*Set label_column"),
    (dict(img=IMAGE, caption=datasets.Value('string')), (None, None),
     r'data: has no column "label" and no class-label column.*Set label_column'),
    (dict(img=IMAGE, label=LABEL), ('image', None), r"data: has no column 'image'; its columns are: img \(Image\)"),
    (dict(img=IMAGE, label=LABEL), (None, 'labels'), r"data: has no column 'labels'.*Set label_column"),
    (dict(img=IMAGE, path=datasets.Value('string'), label=LABEL), ('path', None),
     r"data: has column 'path' of Value, not of images \(datasets.Image\).*Set image_column"),
])
def test_columns_that_cannot_be_told_are_refused_by_name(columns, given, message):
    with pytest.raises(DatasetColumnError, match=message):
        find_columns(_table(columns), *given, 'data')


def test_named_columns_win_over_the_search():
    data = _table(dict(a=IMAGE, b=IMAGE, fine=LABEL, coarse=LABEL))
    assert find_columns(data, 'b', 'coarse', 'data') == ('b', 'coarse')


def test_an_image_folder_loads_without_naming_its_columns(tmp_path):
    root = _image_folder(tmp_path / 'pets', mode='L')
    test = load_image_dataset(str(root), 'test', transform='imagenet', input_size=16, channels=1)
    assert (test.image_column, test.label_column, len(test), test.num_classes) == ('image', 'label', 6, 3)
    x, y = test[0]
    assert x.shape == (1, 16, 16) and y in (0, 1, 2)


def test_distill_names_the_columns_it_found_in_its_yaml(tmp_path):
    root = _image_folder(tmp_path / 'pets')
    plan = plan_distill('resnet20_cifar', str(root), str(tmp_path / 'out'), epochs=1)
    for name in ('train', 'test'):
        assert (plan.data[name]['image_column'], plan.data[name]['label_column']) == ('image', 'label')
    assert plan.datasets['train'].num_classes == 3
    with pytest.raises(DistillError, match=r"has no column 'picture'.*--image-column / --label-column"):
        plan_distill('resnet20_cifar', str(root), str(tmp_path / 'out2'), epochs=1, image_column='picture')
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'out2').exists()
