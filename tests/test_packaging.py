"""Packaging: what a wheel holds (the published twins' catalogue and weights), optional features behind extras."""
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from conftest import ROOT


def test_pyproject_lists_every_package():
    """pyproject.toml lists packages by hand (registry/ ships as jointrd_timm.registry): every subpackage of the
    source tree must be in the list, or a wheel would silently lack it."""
    import tomllib
    listed = set(tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools']['packages'])
    found = {'.'.join(p.parent.relative_to(ROOT).parts) for p in (ROOT / 'jointrd_timm').rglob('__init__.py')}
    assert found | {'jointrd_timm.registry'} == listed


@pytest.mark.timeout(600)
def test_a_built_wheel_lists_and_loads_the_published_twins(tmp_path):
    """Build the wheel, install it (no dependencies) into an empty folder, and use it from a process that cannot see
    the repository: the catalogue lists the published twins and one loads with its shipped weights."""
    dist, site = tmp_path / 'dist', tmp_path / 'site'
    pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
    subprocess.run(pip + ['wheel', '--no-deps', '--no-build-isolation', '-w', str(dist), str(ROOT)], check=True,
                   cwd=tmp_path, capture_output=True)
    wheel, = dist.glob('jointrd_timm-*.whl')
    subprocess.run(pip + ['install', '--no-deps', '--no-index', '--target', str(site), str(wheel)], check=True,
                   cwd=tmp_path, capture_output=True)
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(site)!r}, {sysconfig.get_paths()['purelib']!r}]  # the wheel, then its dependencies
        import timm, torch, jointrd_timm
        from jointrd_timm.models.catalogue import registry_dir
        assert jointrd_timm.__file__.startswith({str(site)!r}), jointrd_timm.__file__
        assert str(registry_dir()).startswith({str(site)!r}), registry_dir()
        names = timm.list_pretrained('plain_*')
        assert 'plain_resnet20_cifar.jointrd_full_cifar10' in names, names
        model = timm.create_model('plain_resnet20_cifar.jointrd_full_cifar10', pretrained=True).eval()
        assert model.pretrained_cfg['file'].startswith({str(site)!r})
        assert jointrd_timm.count_shortcut_additions(model) == 0
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
        print('ok', len(names))
    """)
    # -S: no site-packages processing, so the repository's editable install is invisible; cwd is not the repo
    result = subprocess.run([sys.executable, '-S', '-c', script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith('ok')


def test_a_missing_extra_is_named(monkeypatch):
    import builtins
    from jointrd_timm.extras import MissingExtraError, require
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.split('.')[0] == 'onnx':
            raise ImportError(f'No module named {name!r}')
        return real_import(name, *args, **kwargs)
    monkeypatch.delitem(sys.modules, 'onnx', raising=False)
    monkeypatch.setattr(builtins, '__import__', no_onnx)
    with pytest.raises(MissingExtraError, match=r"ONNX export needs onnx, which is not installed: "
                                                r"pip install 'jointrd-timm\[deploy\]'"):
        require('onnx', 'ONNX export')
    with pytest.raises(MissingExtraError, match=r"needs left_pad_xyz, which is not installed: pip install left_pad_xyz"):
        require('left_pad_xyz', 'something')
