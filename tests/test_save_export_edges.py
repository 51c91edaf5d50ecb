"""Saving and exporting beyond the plain classifier: a space-to-depth stem (TResNet), a feature extractor with one
output, a model without a classifier, a run's data config over its architecture's test-time size, a save stopped
between its two renames, and `jointrd save` of a folder keeping the card and metrics saved with it."""
import json
from pathlib import Path

import pytest
import timm
import torch

from jointrd_timm.cli import main
from jointrd_timm.errors import InputError
from jointrd_timm.integrations import hub
from jointrd_timm.integrations.hub import load_model, save_trained_model
from jointrd_timm.io import input_channels


def test_input_channels_sees_through_a_space_to_depth_stem():
    with torch.device('meta'):
        tresnet = timm.create_model('tresnet_m', in_chans=2)
        resnet = timm.create_model('resnet18', in_chans=1)
    assert input_channels(tresnet) == 2 and input_channels(resnet) == 1
    assert next(m for m in tresnet.modules() if isinstance(m, torch.nn.Conv2d)).in_channels == 32


@pytest.mark.slow  # tresnet_m (30 M parameters), about 9 s; its twin derives in test_coverage and test_graph_rules
def test_a_tresnet_twin_saves_and_loads_back(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('plain_tresnet_m', num_classes=3).eval()
    folder = save_trained_model(model, tmp_path / 'saved')  # timm refused in_chans=48 from the first conv
    config = json.loads((folder / 'config.json').read_text())
    assert config.get('model_args', {}).get('in_chans', 3) == 3
    loaded = load_model(str(folder)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_feature_extractor_with_one_output_exports_as_a_feature_list(tmp_path):
    pytest.importorskip('onnxruntime')
    from jointrd_timm.deploy.export import export_model
    torch.manual_seed(0)
    model = timm.create_model('plain_resnet18', features_only=True, out_indices=(4,)).eval()
    report = export_model(model, tmp_path, input_size=64)
    assert report['files']['onnx']['max_abs_error'] < 1e-3 and report['files']['torchscript']['max_abs_error'] < 1e-3
    import onnx
    assert [o.name for o in onnx.load(str(tmp_path / 'model.onnx')).graph.output] == ['features0']
    loaded = torch.jit.load(str(tmp_path / 'model.torchscript.pt'))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got, expected = loaded(x), model(x)
    assert isinstance(got, list) and len(got) == 1 and got[0].shape == expected[0].shape == (1, 512, 2, 2)


def test_a_model_without_a_classifier_is_refused_before_anything_is_written(tmp_path):
    model = timm.create_model('resnet18', features_only=True, out_indices=(2,))
    with pytest.raises(InputError, match=r"FeatureListNet has no classifier .*features_only.*Save the model it was "
                                         'built from'):
        save_trained_model(model, tmp_path / 'saved')
    assert not list(tmp_path.iterdir())


def test_a_runs_data_config_replaces_the_architectures_test_time_size(tmp_path):
    model = timm.create_model('resnet18', num_classes=10)
    assert model.pretrained_cfg['test_input_size'] == (3, 288, 288)  # resnet18.a1_in1k's
    data_cfg = dict(input_size=(3, 32, 32), crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    folder = save_trained_model(model, tmp_path / 'saved', data_cfg=data_cfg)
    cfg = json.loads((folder / 'config.json').read_text())['pretrained_cfg']
    assert cfg['input_size'] == [3, 32, 32] and 'test_input_size' not in cfg and 'test_crop_pct' not in cfg
    # what timm's validate.py reads (use_test_size) is the run's size
    loaded = load_model(str(folder))
    assert timm.data.resolve_data_config({}, model=loaded, use_test_size=True)['input_size'] == (3, 32, 32)
    kept = json.loads((save_trained_model(model, tmp_path / 'other') / 'config.json').read_text())['pretrained_cfg']
    assert kept['test_input_size'] == [3, 288, 288]  # no data config given: the architecture's own, untouched


def test_a_save_stopped_between_its_renames_never_loses_the_model_it_replaces(tmp_path, monkeypatch):
    model = timm.create_model('resnet18', num_classes=2)
    folder = save_trained_model(model, tmp_path / 'saved')
    original = (folder / 'model.safetensors').read_bytes()
    rename = Path.rename

    def stop_before_the_new_one_lands(self, target):
        if self.name.endswith('.tmp'):
            raise KeyboardInterrupt
        return rename(self, target)
    monkeypatch.setattr(Path, 'rename', stop_before_the_new_one_lands)
    for _ in range(2):  # stopped twice at the same point: the replaced model is still on disk, aside
        with pytest.raises(KeyboardInterrupt):
            save_trained_model(timm.create_model('resnet18', num_classes=2), folder)
        assert (tmp_path / '.saved.old' / 'model.safetensors').read_bytes() == original
    monkeypatch.setattr(Path, 'rename', rename)
    again = save_trained_model(model, folder)
    assert (again / 'model.safetensors').is_file() and not (tmp_path / '.saved.old').exists()
    assert not (tmp_path / '.saved.tmp').exists()


def test_save_of_a_folder_keeps_the_card_and_metrics_saved_with_it(tmp_path, capsys):
    model = timm.create_model('resnet18', num_classes=3)
    source = save_trained_model(model, tmp_path / 'run' / 'model', metrics=dict(test_acc=91.5),
                                model_card='# my twin\n')
    assert main(['save', str(tmp_path / 'run'), str(tmp_path / 'copy')]) == 0
    assert (tmp_path / 'copy' / 'README.md').read_text() == '# my twin\n'
    assert json.loads((tmp_path / 'copy' / 'metrics.json').read_text()) == dict(test_acc=91.5)
    assert (tmp_path / 'copy' / 'model.safetensors').read_bytes() == (source / 'model.safetensors').read_bytes()
    assert hub.saved_beside('resnet18') == {}  # a name: nothing saved beside it


def test_the_exact_conversion_report_feeds_a_grey_model_grey_images():
    from jointrd_timm.deploy.exact import exact_conversion_report, exact_plain
    torch.manual_seed(0)
    model = timm.create_model('resnet18', in_chans=1, num_classes=4).eval()
    report = exact_conversion_report(model, exact_plain(model), input_size=32)
    assert report['max_abs_error'] < 1e-3


def test_latency_comparison_needs_a_timed_repeat():
    from jointrd_timm.deploy.latency import compare_latency
    with pytest.raises(ValueError, match=r'repeats >= 1 and warmup >= 0 \(got 0, 5\)'):
        compare_latency({'a': lambda: None}, repeats=0)
    assert compare_latency({'a': lambda: None}, repeats=3, warmup=0)['a']['samples'] == 3


@pytest.mark.parametrize('name', ['a/b', '..', '', 'x\\y'])
def test_an_export_name_with_a_folder_in_it_is_refused_before_anything_is_written(tmp_path, name):
    from jointrd_timm.deploy.export import ExportError, export_model
    model = timm.create_model('plain_resnet20_cifar', num_classes=3)
    with pytest.raises(ExportError, match='give a file name without a folder'):
        export_model(model, tmp_path / 'out', name=name, input_size=32)
    assert not (tmp_path / 'out').exists()
