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
