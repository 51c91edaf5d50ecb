"""The documentation keeps up with the code: every configuration field is described in docs/jointrd.md."""
import dataclasses

import pytest

from conftest import ROOT


@pytest.mark.parametrize('owner', ['JointRDConfig', 'Recipe', 'Schedule', 'runner'])
def test_every_config_field_is_documented(owner):
    from jointrd_timm.methods import JointRDConfig
    from jointrd_timm.recipes import Recipe, Schedule
    from jointrd_timm.training.runner import RUNNER_DEFAULTS
    fields = list(RUNNER_DEFAULTS) if owner == 'runner' else \
        [f.name for f in dataclasses.fields({'JointRDConfig': JointRDConfig, 'Recipe': Recipe, 'Schedule': Schedule}[owner])]
    page = (ROOT / 'docs' / 'jointrd.md').read_text()
    missing = [name for name in fields if f'`{name}`' not in page]
    assert not missing, f'docs/jointrd.md does not describe {owner} field(s) {missing}'


def test_benchmarks_readme_lists_every_script_once():
    """benchmarks/README.md's table names each script of the folder exactly once, and no script that is not there."""
    import re
    readme = (ROOT / 'benchmarks' / 'README.md').read_text()
    listed = re.findall(r'^\| `([\w.]+\.py)` \|', readme, re.M)
    scripts = sorted(p.name for p in (ROOT / 'benchmarks').glob('*.py'))
    assert sorted(listed) == scripts, (sorted(set(scripts) - set(listed)), sorted(set(listed) - set(scripts)))
    assert len(listed) == len(set(listed))


def test_the_readmes_plain_pytorch_example_runs_as_written_and_its_twin_exports(tmp_path, monkeypatch):
    """The README's "In plain PyTorch" block, run as it stands (with a two-batch loader and one epoch): a deployed
    twin with no shortcut addition, saved in timm's Hub format, which `jointrd export` then folds and exports."""
    import re
    import timm
    import torch
    from jointrd_timm.cli import main
    block = next(b for b in re.findall(r'```python\n(.*?)```', (ROOT / 'README.md').read_text(), re.S)
                 if 'from jointrd_timm.methods import JointRD' in b)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    scope = dict(epochs=1, loader=[(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))] * 2)
    exec(block, scope)
    deployed = scope['deployed']
    assert scope['jointrd_timm'].count_shortcut_additions(deployed) == 0
    plain = timm.create_model('plain_resnet20_cifar', num_classes=10)
    plain.load_state_dict(deployed.state_dict(), strict=True)
    saved = timm.create_model(f'local-dir:{tmp_path / "runs" / "my-twin"}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(saved(x), deployed.eval()(x), atol=1e-5)
    assert main(['export', 'runs/my-twin', '--output-dir', 'exports']) == 0
    assert (tmp_path / 'exports' / 'my-twin.onnx').stat().st_size > 0
