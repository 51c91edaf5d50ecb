"""Class names travel with the weights: a run saves its training data's class names as timm's ``label_names`` in
config.json, and ``jointrd eval`` matches the labels of the data it is given to the model's outputs by name."""
import json

import timm
import torch
from PIL import Image

from conftest import tiny_yaml
from jointrd_timm.cli import main
from jointrd_timm.integrations.hub import model_label_names, save_trained_model
from jointrd_timm.training.runner import load_config, train


def _folder(root, counts):
    """root/test/<class>/<i>.png, ``counts[class]`` grey-ish 8 px images per class."""
    for name, count in counts.items():
        (root / 'test' / name).mkdir(parents=True)
        for i in range(count):
            Image.new('RGB', (8, 8), (40 * i, 20, 30)).save(root / 'test' / name / f'{i}.png')
    return root


def _always(output: int, names=None, folder=None, classes: int = 3):
    """A model whose every prediction is ``output``, saved (with ``names`` as its classes, where given)."""
    model = timm.create_model('resnet20_cifar', num_classes=classes)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[output] = 10.0
    save_trained_model(model, folder, label_names=names)
    return folder


def test_a_run_saves_its_training_datas_class_names_and_timm_reads_them_back(tmp_path):
    config = load_config(tiny_yaml(tmp_path, method='ce', epochs=1, limit=32))
    train(config, output_dir=str(tmp_path / 'out'), device='cpu')
    saved = json.loads((tmp_path / 'out' / 'model' / 'config.json').read_text())
    assert saved['label_names'] == [str(i) for i in range(10)]  # the digits' ClassLabel names
    model = timm.create_model(f'local-dir:{tmp_path / "out" / "model"}', pretrained=True)
    assert model_label_names(model) == {i: str(i) for i in range(10)}


def test_names_replace_those_the_model_came_with_and_an_empty_list_drops_them(tmp_path):
    model = timm.create_model('resnet20_cifar', num_classes=3)
    save_trained_model(model, tmp_path / 'named', label_names=['cat', 'dog', 'frog'])
    named = timm.create_model(f'local-dir:{tmp_path / "named"}', pretrained=True)
    assert named.pretrained_cfg['label_names'] == ['cat', 'dog', 'frog']
    save_trained_model(named, tmp_path / 'kept')  # names not given: the model's own are kept
    assert model_label_names(timm.create_model(f'local-dir:{tmp_path / "kept"}', pretrained=True)) == \
        {0: 'cat', 1: 'dog', 2: 'frog'}
    save_trained_model(named, tmp_path / 'dropped', label_names=[])  # retrained on integer labels: not its classes
    saved = json.loads((tmp_path / 'dropped' / 'config.json').read_text())
    assert 'label_names' not in saved and 'label_names' not in saved['pretrained_cfg']
    save_trained_model(model, tmp_path / 'partial', label_names=['cat', 'dog'])  # the third output has no name
    assert model_label_names(timm.create_model(f'local-dir:{tmp_path / "partial"}', pretrained=True)) == \
        {0: 'cat', 1: 'dog'}


def test_eval_matches_the_datas_classes_to_the_models_outputs_by_name(tmp_path, capsys):
    # the data's labels: a = 0 (3 images), b = 1 (1 image); the model's outputs: b, a, c, and it always says 'a'
    data = _folder(tmp_path / 'images', dict(a=3, b=1))
    model = _always(1, ['b', 'a', 'c'], tmp_path / 'model')
    argv = ['eval', str(model), '--dataset', str(data), '--input-size', '8', '--transform', 'cifar']
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert 'top-1 75.00 % on 4 images' in captured.out  # by index it would be 25 % (only b's image, label 1)
    assert "matched to the model's outputs by name" in captured.err
    unnamed = _always(1, None, tmp_path / 'unnamed')  # no names: label i is output i, and the note says it
    assert main(['eval', str(unnamed)] + argv[2:]) == 0
    captured = capsys.readouterr()
    assert 'top-1 25.00 % on 4 images' in captured.out
    assert 'the model names no classes, so label i is taken as output i' in captured.err


def test_eval_refuses_data_naming_a_class_the_model_was_not_trained_for(tmp_path, capsys):
    data = _folder(tmp_path / 'images', dict(a=1, zebra=1))
    model = _always(0, ['a', 'b', 'c'], tmp_path / 'model')
    assert main(['eval', str(model), '--dataset', str(data), '--input-size', '8', '--transform', 'cifar']) == 1
    err = capsys.readouterr().err
    assert "name classes the model was not trained for: 'zebra' (its config.json names 3: a, b, c)" in err
    assert 'jointrd distill --num-classes' in err


def test_eval_of_the_same_classes_in_the_same_order_adds_no_note(tmp_path, capsys):
    data = _folder(tmp_path / 'images', dict(a=1, b=1, c=2))
    model = _always(2, ['a', 'b', 'c'], tmp_path / 'model')
    assert main(['eval', str(model), '--dataset', str(data), '--input-size', '8', '--transform', 'cifar']) == 0
    captured = capsys.readouterr()
    assert 'top-1 50.00 % on 4 images' in captured.out and 'note:' not in captured.err
