"""Recipe coverage as a regression test: one small architecture per timm module that derives goes along the whole
recipe path (fading twin = teacher at s = 1, a JointRD step, deployment, folding + ONNX export) through
``jointrd_timm.coverage.check_recipe_path``, the function behind benchmarks/results/twin_coverage.md's recipe
columns. The default run keeps the families the recipe is most used on; the others are slow."""
import pytest

import jointrd_timm  # noqa: F401
from jointrd_timm.coverage import STEPS, check_recipe_path, recipe_outcome

# the smallest variant of each family (benchmarks/results/twin_coverage.json, params), at a small input
FAST = ['test_resnet', 'regnetx_002', 'mobilenetv3_small_050', 'test_convnext', 'test_byobnet', 'test_nfnet',
        'ghostnet_050']
SLOW = ['mobilenetv2_035', 'cs3darknet_focus_s', 'dla46_c', 'resnest14d', 'skresnet18', 'legacy_seresnet18', 'dpn48b',
        'hrnet_w18_small', 'res2next50', 'resnetv2_18', 'eca_botnext26ts_256', 'test_mambaout', 'starnet_s050',
        'repghostnet_050', 'cspnext_tiny', 'fasternet_t0', 'lcnetv2_small', 'inception_next_atto', 'rexnet_100',
        'hardcorenas_b', 'repvit_m1', 'hgnetv2_b0', 'poolformerv2_s12', 'lowformer_e1', 'convmixer_768_32',
        'legacy_xception', 'eca_vovnet39b', 'xception41', 'tresnet_m']


# refused by design, with the reason's words (benchmarks/results/twin_coverage.md counts them as refused)
REFUSED = {'hrnet_w18_small': ('jointrd', 'StageLayoutError', 'not in its module chain'),
           'legacy_xception': ('jointrd', 'StageLayoutError', 'not a sequential container'),
           'xception41': ('jointrd', 'StageLayoutError', 'not a sequential container')}


def _assert_passes(arch, size):
    results = check_recipe_path(arch, size=size)
    expected = {step: 'pass' for step in STEPS}
    if arch in REFUSED:
        step, error, words = REFUSED[arch]
        expected[step] = 'refused'
        assert results[step]['error'] == error and words in results[step]['reason'], results[step]
    assert {step: r['status'] for step, r in results.items()} == expected, results
    assert results['fade']['max_abs_diff'] <= 1e-4 and results['deploy']['max_abs_diff'] <= 1e-4
    assert results['deploy']['shortcuts_left'] == 0
    if arch not in REFUSED:
        assert results['jointrd']['params_reached'] == results['jointrd']['params_alone'] > 0
    assert results['export']['onnx_max_abs_error'] <= results['export']['tolerance']


@pytest.mark.parametrize('arch', FAST)
def test_recipe_path_passes(arch):
    _assert_passes(arch, 32)


@pytest.mark.slow
@pytest.mark.parametrize('arch', SLOW)
def test_recipe_path_passes_slow(arch):
    _assert_passes(arch, 64)


def test_a_refused_step_is_counted_with_its_reason():
    # LCNet has no shortcut to remove (not registered as plain_lcnet_035): a named refusal, not a crash
    results = check_recipe_path('lcnet_035', size=32, export=False)
    assert results['fade'] == dict(status='refused', error='NotResidualError', reason=results['fade']['reason'])
    assert 'no shortcut addition' in results['fade']['reason']
    assert all(results[s]['status'] == 'skipped' for s in ('jointrd', 'deploy', 'export'))


@pytest.mark.slow
def test_an_operator_the_onnx_exporter_lacks_is_a_named_refusal():
    # halo attention unfolds with sizes the ONNX exporter cannot read: the export step is refused with the reason
    results = check_recipe_path('halonet_h1')
    assert [results[s]['status'] for s in STEPS] == ['pass', 'pass', 'pass', 'refused']
    assert results['export']['error'] == 'UnsupportedExportError' and 'Unfold' in results['export']['reason']


def test_recipe_outcome_names_an_architecture_by_its_worst_step():
    def steps(*statuses):
        return {s: dict(status=v) for s, v in zip(STEPS, statuses)}
    assert recipe_outcome(steps('pass', 'pass', 'pass', 'pass')) == 'pass'
    assert recipe_outcome(steps('pass', 'refused', 'pass', 'pass')) == 'refused'
    assert recipe_outcome(steps('refused', 'skipped', 'skipped', 'skipped')) == 'refused'
    assert recipe_outcome(steps('pass', 'refused', 'pass', 'crash')) == 'failed'
    assert recipe_outcome(steps('pass', 'fail', 'pass', 'pass')) == 'failed'
