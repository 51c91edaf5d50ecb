"""benchmarks/shortcut_audit.py: the second detector's verdict on real twins, and its page."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))


def test_audit_finds_no_shortcut_in_a_twin_and_says_why_it_cannot_look(monkeypatch):
    import torch
    import shortcut_audit
    from jointrd_timm.deploy import memory
    clean = shortcut_audit.audit('resnet20_cifar')
    assert clean == dict(status='clean', shortcut_additions=0, folded=True, layers_kept_whole=0)
    # input-dependent 'same' padding: traced with timm's Conv2dSame layers kept whole ...
    kept = shortcut_audit.audit('tf_mobilenetv3_small_minimal_100')
    assert kept['status'] == 'clean' and kept['layers_kept_whole'] > 0
    # ... and untraceable without that
    monkeypatch.setattr(memory._KeepTimmLayers, 'is_leaf_module', torch.fx.Tracer.is_leaf_module)
    untraceable = shortcut_audit.audit('tf_mobilenetv3_small_minimal_100')
    assert untraceable['status'] == 'not traceable' and 'TraceError' in untraceable['reason']


def test_audit_page_counts_by_module_and_lists_the_holes():
    import shortcut_audit
    coverage = {'a': dict(module='resnet', status='derived', params=5, forward_ok=True),
                'b': dict(module='resnet', status='derived', params=3, forward_ok=True),
                'c': dict(module='xception', status='derived', params=40e6, forward_ok=True),
                'd': dict(module='vit', status='transformer (refused)')}
    assert shortcut_audit.candidates(coverage, 30e6) == ['b', 'a']  # smallest first, under the cap, derived only
    results = {'a': dict(status='clean', shortcut_additions=0), 'b': dict(status='shortcut left', shortcut_additions=4),
               'c': dict(status='not traceable', reason='TraceError: control flow')}
    page = '\n'.join(shortcut_audit.markdown(results, coverage))
    assert '**1 of 3 twins have no shortcut addition' in page and '1 have one; 1 could not be traced' in page
    assert '| resnet | 1 | 1 | 0 |' in page and '| xception | 0 | 0 | 1 |' in page
    assert '- `b`: 4 shortcut additions' in page and '- `c`: TraceError: control flow' in page
    assert 'kept whole' not in page
    results['a']['layers_kept_whole'] = 3
    assert '1 of them were traced with timm\'s untraceable layers kept whole' in \
        '\n'.join(shortcut_audit.markdown(results, coverage))


def test_audit_of_named_twins_keeps_the_other_rows_and_their_command(tmp_path, monkeypatch):
    import json
    import shortcut_audit
    old = dict(meta=dict(command='python benchmarks/shortcut_audit.py', seconds=100),
               models={'resnet32_cifar': dict(status='clean', shortcut_additions=0, folded=True)})
    (tmp_path / 'shortcut_audit.json').write_text(json.dumps(old))
    argv = ['benchmarks/shortcut_audit.py', '--names', 'resnet20_cifar', '--out', str(tmp_path)]
    monkeypatch.setattr(sys, 'argv', argv)
    shortcut_audit.main()
    record = json.loads((tmp_path / 'shortcut_audit.json').read_text())
    assert set(record['models']) == {'resnet32_cifar', 'resnet20_cifar'}
    assert record['meta']['command'].startswith('python benchmarks/shortcut_audit.py (then ')
    assert '--names resnet20_cifar' in record['meta']['command'] and record['meta']['seconds'] >= 100
    assert '**2 of 2 twins have no shortcut addition' in (tmp_path / 'shortcut_audit.md').read_text()
