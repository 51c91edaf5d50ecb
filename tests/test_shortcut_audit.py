"""benchmarks/shortcut_audit.py: the second detector's verdict on real twins, and its page."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))


def test_audit_finds_no_shortcut_in_a_twin_and_says_why_it_cannot_look():
    import shortcut_audit
    clean = shortcut_audit.audit('resnet20_cifar')
    assert clean == dict(status='clean', shortcut_additions=0, folded=True)
    untraceable = shortcut_audit.audit('tf_mobilenetv3_small_minimal_100')  # input-dependent 'same' padding
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
