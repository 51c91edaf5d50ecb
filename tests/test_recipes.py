"""The recipes module: named recipes, their ids and the configs they produce (the benchmarks' rows built from them:
tests/test_benchmark_suite.py)."""
import pytest

from jointrd_timm.methods.jointrd import JointRDConfig
from jointrd_timm.recipes import DEFAULT_RECIPE, REFERENCE_JOINTRD, SCHEDULES, get_recipe, recipe_for


def test_replace_records_the_changed_fields_in_the_id_and_get_recipe_reads_it_back():
    row = DEFAULT_RECIPE.replace(eta_min=1.0, shortcut_fade=0.5)
    assert row.id == 'default,eta_min=1.0,shortcut_fade=0.5'
    assert row.shortcut_fade == 0.5 and row.jointrd['eta_min'] == 1.0
    assert DEFAULT_RECIPE.shortcut_fade != 0.5  # frozen: the default is untouched
    assert row.jointrd_config().eta_min == 1.0
    assert get_recipe('default,eta_min=1.0,teacher_mode=joint').jointrd_config().teacher_mode == 'joint'


def test_unknown_and_invalid_fields_are_refused_when_the_recipe_is_made():
    with pytest.raises(ValueError, match='eta_mn'):
        DEFAULT_RECIPE.replace(eta_mn=1.0)
    with pytest.raises(ValueError, match='joint_step_order'):
        DEFAULT_RECIPE.replace(joint_step_order='sometimes')


def test_teacher_first_recipe_takes_the_teacher_sgd_from_the_run_schedule():
    recipe = DEFAULT_RECIPE.replace(teacher_mode='joint', joint_step_order='teacher_first')
    schedule = SCHEDULES['cpu-budget'].replace(epochs=7, lr=0.05)
    fields = recipe.jointrd_model('resnet20_cifar', None, schedule, num_classes=10)['kwargs']['jointrd']
    assert fields['teacher_optimizer'] == dict(lr=0.05, momentum=0.9, nesterov=True,
                                               weight_decay=schedule.weight_decay, cosine_epochs=7)
    assert JointRDConfig.from_dict(fields).joint_step_order == 'teacher_first'
    # a recipe that states its own teacher SGD keeps it
    own = dict(lr=0.01, cosine_epochs=3)
    fields = recipe.replace(teacher_optimizer=own).jointrd_model('resnet20_cifar', None, schedule)['kwargs']['jointrd']
    assert fields['teacher_optimizer'] == own
    # a step schedule's teacher decays as the twin does: at the same epochs, by the same factor
    multistep = recipe.run_fields(SCHEDULES['cifar'])['teacher_optimizer']
    assert recipe.jointrd_model('resnet20_cifar', None, SCHEDULES['cifar'])['kwargs']['jointrd'] == \
        recipe.run_fields(SCHEDULES['cifar'])
    assert multistep == dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, milestones=[100, 150], gamma=0.1)
    step = recipe.jointrd_model('resnet18', None, SCHEDULES['imagenet'])['kwargs']['jointrd']['teacher_optimizer']
    assert step['milestones'] == [30, 60, 90] and 'cosine_epochs' not in step
    assert JointRDConfig.from_dict(dict(fields, teacher_optimizer=multistep)).joint_step_order == 'teacher_first'
    # the simultaneous default gets none (JointRDConfig refuses one there)
    assert 'teacher_optimizer' not in DEFAULT_RECIPE.jointrd_model('resnet20_cifar', None, schedule)['kwargs']['jointrd']


def test_model_configs_carry_the_recipe_into_both_runs():
    pair = DEFAULT_RECIPE.jointrd_model('regnetx_002', 'teacher/model', SCHEDULES['cifar'], num_classes=10)
    kwargs = pair['kwargs']
    assert pair['key'] == 'jointrd_model' and kwargs['init_student_from_teacher'] is True
    assert kwargs['student'] == dict(model_name='plain_regnetx_002', num_classes=10, shortcut_fade=True)
    assert kwargs['teacher'] == dict(model_name='regnetx_002', num_classes=10, checkpoint='teacher/model')
    assert kwargs['jointrd'] == {**REFERENCE_JOINTRD, **DEFAULT_RECIPE.jointrd,
                                 'shortcut_fade': DEFAULT_RECIPE.shortcut_fade}
    alone = DEFAULT_RECIPE.twin_alone_model('regnetx_002', 'teacher/model', num_classes=10)
    assert alone == dict(key='fading_model', kwargs=dict(
        student=dict(model_name='plain_regnetx_002', num_classes=10), shortcut_fade=DEFAULT_RECIPE.shortcut_fade,
        teacher_checkpoint='teacher/model'))
    # an architecture without a measured recipe of its own trains with the default
    assert recipe_for('regnetx_002') is DEFAULT_RECIPE


def test_short_run_warning_names_the_steps_and_the_epochs_that_would_do():
    from jointrd_timm.recipes import MIN_FADE_STEPS, short_run_warning
    warning = short_run_warning(DEFAULT_RECIPE, epochs=3, steps_per_epoch=23)
    assert warning.startswith('the twin trains for 69 optimizer steps (3 epochs of 23)')
    assert f'{int(DEFAULT_RECIPE.shortcut_fade * 69)} of them' in warning
    assert f'--epochs {-(-MIN_FADE_STEPS // 23)}' in warning
    assert short_run_warning(DEFAULT_RECIPE, epochs=MIN_FADE_STEPS, steps_per_epoch=1) is None
    assert short_run_warning(get_recipe('reference'), epochs=1, steps_per_epoch=1) is None  # nothing fades


def test_outcome_warning_flags_a_teacher_near_chance_and_a_twin_that_kept_little_of_it():
    from jointrd_timm.recipes import outcome_warning
    # 10 classes, chance 10 %: a teacher trained here at 15 % is near chance (under 10 % + 0.1 x 90 %)
    warning = outcome_warning(15.0, 14.0, num_classes=10, epochs=4, teacher_epochs=2)
    assert warning.startswith('the teacher is at 15.00 % on the test set, near chance (10.00 % for 10 classes)')
    assert 'Train it longer (--teacher-epochs, 2 now)' in warning
    # a loaded teacher: the fix is another teacher, not more epochs
    assert 'Give a teacher trained on this data' in outcome_warning(15.0, 14.0, num_classes=10, epochs=4)
    # a trained teacher (90 %) and a twin under 10 % + 0.25 x 80 % = 30 %: it kept little; at 30 % and above, no
    warning = outcome_warning(90.0, 29.5, num_classes=10, epochs=4)
    assert warning.startswith("the twin kept little of its teacher's accuracy: 29.50 % against 90.00 %")
    assert '(--epochs, 4 now)' in warning
    assert outcome_warning(90.0, 30.5, num_classes=10, epochs=4) is None
    assert outcome_warning(90.0, 89.0, num_classes=10, epochs=4) is None
    # the thresholds follow the class count: 19.5 % of 100 classes is well above chance (1 %) for a 60 % teacher
    assert outcome_warning(60.0, 19.5, num_classes=100, epochs=4) is None
    assert outcome_warning(60.0, 10.0, num_classes=100, epochs=4) is not None


def test_per_architecture_recipes_have_names_and_their_former_ids_still_resolve():
    from jointrd_timm.recipes import ARCH_RECIPES, RECIPE_ALIASES, RECIPES
    assert {'joint-teacher', 'joint-teacher-first', 'unnormalised-loss'} <= set(RECIPES)
    deep = recipe_for('resnet110_cifar')
    assert deep is RECIPES['joint-teacher-first'] and deep.id == 'joint-teacher-first'
    assert recipe_for('resnet18_cifar').jointrd_config().loss_normalization == 'none'
    assert set(ARCH_RECIPES.values()) <= set(RECIPES)
    # the ids records and cards name: the default plus its changes
    old = 'default,eta_min=1.0,hybrid_teacher_bn=running,joint_step_order=teacher_first,margin_refresh=epoch,' \
          'teacher_mode=joint'
    assert RECIPE_ALIASES[old] == 'joint-teacher-first' and get_recipe(old) is deep
    assert get_recipe('default,loss_normalization=none') is RECIPES['unnormalised-loss']
    # depths 20 and 56: kd-low-lr plus the block targets, at weight 5 and 20 (a mean over 9 and 27 blocks)
    assert recipe_for('resnet32_cifar') is DEFAULT_RECIPE  # an architecture not measured keeps the default
    for name, weight in (('kd-low-lr-blocks', 5.0), ('kd-low-lr-blocks20', 20.0)):
        blocks = RECIPES[name]
        assert get_recipe(f'default,block_loss_weight={weight},kd_weight=1.0,lr_scale=0.2') is blocks
        assert (blocks.lr_scale, blocks.jointrd_config().kd_weight, blocks.jointrd_config().block_loss_weight) == \
            (0.2, 1.0, weight)
    # depth 20: kd-low-lr-blocks with the fade over 60 % of the run
    fade60 = recipe_for('resnet20_cifar')
    assert fade60 is RECIPES['kd-low-lr-blocks-fade60'] and fade60 is get_recipe(
        'default,block_loss_weight=5.0,kd_weight=1.0,lr_scale=0.2,shortcut_fade=0.6')
    blocks = RECIPES['kd-low-lr-blocks']
    assert (fade60.shortcut_fade, blocks.shortcut_fade) == (0.6, 0.8) and fade60.jointrd == blocks.jointrd
    # depth 56: kd-low-lr-blocks20 with the joint teacher of depth 110's recipe, its own SGD on the run's schedule
    joint = recipe_for('resnet56_cifar')
    assert joint is RECIPES['kd-low-lr-blocks20-joint'] and joint is get_recipe(
        'default,block_loss_weight=20.0,eta_min=1.0,hybrid_teacher_bn=running,joint_step_order=teacher_first,'
        'kd_weight=1.0,lr_scale=0.2,margin_refresh=epoch,teacher_mode=joint')
    fields = joint.run_fields(SCHEDULES['cifar'])
    assert (fields['block_loss_weight'], fields['kd_weight'], fields['teacher_mode'], fields['joint_step_order']) == \
        (20.0, 1.0, 'joint', 'teacher_first') and fields['teacher_optimizer']['lr'] == SCHEDULES['cifar'].lr
    # a named recipe trains exactly as the default with those changes did
    changed = DEFAULT_RECIPE.replace(eta_min=1.0, teacher_mode='joint', joint_step_order='teacher_first',
                                     hybrid_teacher_bn='running', margin_refresh='epoch')
    assert changed.id == old
    assert deep.jointrd_model('resnet110_cifar', 'ck', SCHEDULES['cifar']) == \
        changed.jointrd_model('resnet110_cifar', 'ck', SCHEDULES['cifar'])
    # rows derived from a named recipe are named after it
    assert deep.replace(eta_min=0.5).id == 'joint-teacher-first,eta_min=0.5'
    assert deep.replace(description='x').id == 'joint-teacher-first'
    with pytest.raises(ValueError, match=r"Unknown recipe 'joint'; recipes: \['default', 'dirac', 'joint-teacher'"):
        get_recipe('joint')


def test_schedule_writes_each_optimizer_and_scheduler_section_in_one_place():
    cifar, imagenet, budget = SCHEDULES['cifar'], SCHEDULES['imagenet'], SCHEDULES['cpu-budget']
    assert cifar.optimizer() == dict(key='SGD', kwargs=dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4))
    assert cifar.scheduler() == dict(key='MultiStepLR', kwargs=dict(milestones=[100, 150], gamma=0.1))
    assert imagenet.scheduler() == dict(key='StepLR', kwargs=dict(step_size=30, gamma=0.1))
    assert budget.scheduler() == dict(key='CosineAnnealingLR', kwargs=dict(T_max=5))
    # a run of another length than the setting's decays by cosine over its own epochs, at its own lr
    assert cifar.for_run(200) is cifar and cifar.for_run(None, 0.05).lr == 0.05
    short = cifar.for_run(30, 0.05)
    assert (short.epochs, short.lr, short.decay, short.batch_size) == (30, 0.05, 'cosine', 128)
    assert short.scheduler() == cifar.scheduler(30) == dict(key='CosineAnnealingLR', kwargs=dict(T_max=30))
    # a method's own SGD (a joint teacher's, a discriminator's) decays as the run does
    assert cifar.side_optimizer(lr=1e-3) == dict(lr=1e-3, milestones=[100, 150], gamma=0.1)
    assert imagenet.side_optimizer(lr=1e-3) == dict(lr=1e-3, milestones=[30, 60, 90], gamma=0.1)
    assert short.side_optimizer(lr=1e-3) == dict(lr=1e-3, cosine_epochs=30)


def test_lr_scale_sets_the_twins_peak_lr_is_recorded_in_the_id_and_must_be_positive():
    slower = DEFAULT_RECIPE.replace(lr_scale=0.2, kd_weight=1.0)
    assert slower.id == 'default,kd_weight=1.0,lr_scale=0.2'
    assert get_recipe(slower.id).lr_scale == 0.2
    assert slower.conversion_lr(0.1) == pytest.approx(0.02)
    assert DEFAULT_RECIPE.conversion_lr(0.1) == 0.1
    # a recipe field, not a JointRDConfig one: it does not reach the method's config
    assert 'lr_scale' not in slower.jointrd_model('resnet20_cifar', None, num_classes=10)['kwargs']['jointrd']
    for bad in (0, -0.5, '0.2', True):
        message = r'lr_scale must be a finite positive number .* got ' + repr(bad).replace('.', r'\.')
        with pytest.raises(ValueError, match=message):
            DEFAULT_RECIPE.replace(lr_scale=bad)


def test_get_recipe_reads_back_any_id_and_names_a_malformed_one():
    for recipe in (DEFAULT_RECIPE.replace(shortcut_fade=0.5, teacher_mode='joint', shortcut_fade_mode='share'),
                   get_recipe('joint-teacher').replace(eta_min=0.5), DEFAULT_RECIPE.replace(shortcut_fade=None)):
        assert get_recipe(recipe.id) == recipe
    with pytest.raises(ValueError, match=r"Unknown recipe 'defualt'; recipes: \['default'"):
        get_recipe('defualt,lr_scale=0.5')
    with pytest.raises(ValueError, match=r"each change after the name is field=value, got 'lr_scale'"):
        get_recipe('default,lr_scale')
    with pytest.raises(ValueError, match=r"Unknown recipe field\(s\) \['lr_scal'\]"):
        get_recipe('default,lr_scal=0.5')


def test_dirac_init_reaches_the_twin_is_recorded_as_held_and_is_validated():
    recipe = get_recipe('kd-low-lr').replace(dirac=True, dirac_init=[0, 1])  # a list, as --variant's JSON gives it
    assert recipe.dirac_init == (0.0, 1.0) and recipe.id == 'kd-low-lr,dirac=True,dirac_init=(0.0, 1.0)'
    assert get_recipe(recipe.id) == recipe  # the comma inside the value does not split the id
    student = recipe.jointrd_model('resnet20_cifar', 'T', num_classes=10)['kwargs']['student']
    assert student == dict(model_name='plain_resnet20_cifar', num_classes=10, dirac=True, dirac_init=(0.0, 1.0),
                           shortcut_fade=True)
    alone = recipe.twin_alone_model('resnet20_cifar', 'T', num_classes=10)['kwargs']['student']
    assert alone['dirac_init'] == (0.0, 1.0) and 'shortcut_fade' not in alone
    # DiracNets' start is the default and stays unstated
    assert 'dirac_init' not in get_recipe('dirac').twin_kwargs()
    with pytest.raises(ValueError, match=r'dirac_init \(0\.0, 1\.0\) without dirac=True changes nothing'):
        DEFAULT_RECIPE.replace(dirac_init=(0.0, 1.0))
    for bad in ((1.0, 0.0), (1.0,), 'teacher', (True, 1.0)):
        with pytest.raises(ValueError, match=r'dirac_init must be \(alpha, beta\), two numbers with beta != 0'):
            DEFAULT_RECIPE.replace(dirac=True, dirac_init=bad)


def test_batch_scale_gives_the_twin_more_steps_in_the_same_epochs_and_must_be_positive():
    from jointrd_timm.training.configs import build_config
    smaller = get_recipe('kd-low-lr').replace(batch_scale=0.5)
    assert smaller.id == 'kd-low-lr,batch_scale=0.5' and get_recipe(smaller.id).batch_scale == 0.5
    teacher_run = SCHEDULES['cifar'].for_run(4)
    twin_run = smaller.twin_schedule(teacher_run)
    assert (twin_run.batch_size, twin_run.epochs, twin_run.lr) == (teacher_run.batch_size // 2, 4, 0.02)
    assert DEFAULT_RECIPE.twin_schedule(teacher_run).batch_size == teacher_run.batch_size
    assert DEFAULT_RECIPE.replace(batch_scale=1e-6).twin_schedule(teacher_run).batch_size == 1  # at least one
    assert DEFAULT_RECIPE.replace(batch_scale=0.3).twin_schedule(teacher_run.replace(batch_size=10)).batch_size == 3
    # the run's training loader reads that batch; evaluation keeps its own
    model = smaller.jointrd_model('resnet20_cifar', None, twin_run, num_classes=10)
    assert 'batch_scale' not in model['kwargs']['jointrd']
    config = build_config(dict(train='A', test='B', val='B'), model, twin_run, 'jointrd')
    assert config['train']['train_data_loader']['kwargs']['batch_size'] == teacher_run.batch_size // 2
    for bad in (0, -0.5, '0.5', True):
        message = r'batch_scale must be a finite positive number .* got ' + repr(bad).replace('.', r'\.')
        with pytest.raises(ValueError, match=message):
            DEFAULT_RECIPE.replace(batch_scale=bad)


def test_recipe_flags_are_booleans_and_yaml_words_read_as_values():
    for name in ('init_from_teacher', 'keep_projection_shortcuts', 'dirac'):
        with pytest.raises(ValueError, match=rf"Recipe 'default': {name} must be true or false, got 'maybe'"):
            get_recipe(f'default,{name}=maybe')
    assert get_recipe('default,keep_projection_shortcuts=true').keep_projection_shortcuts is True
    assert get_recipe('default,shortcut_fade=null').shortcut_fade is None
    # a JointRDConfig field that is not a number is named as such, not as a comparison failing inside the method
    with pytest.raises(ValueError, match=r"kd_weight must be a finite number >= 0 \(0 turns the term off\), got 'abc'"):
        get_recipe('default,kd_weight=abc')


def test_a_teacher_tag_or_a_twin_name_gets_its_architectures_recipe_and_bad_names_are_refused():
    assert recipe_for('resnet56_cifar.ce_full_cifar10') is recipe_for('resnet56_cifar') \
        is recipe_for('plain_resnet56_cifar') is recipe_for('plain_resnet56_cifar.jointrd_full_cifar10')
    assert recipe_for('resnet56_cifar') is not DEFAULT_RECIPE
    with pytest.raises(TypeError, match='get_recipe takes a recipe name .* got 5'):
        get_recipe(5)
    for label in ('name=kd-low-lr', 'record=x.md'):  # a label would pass the default off as another recipe
        with pytest.raises(ValueError, match='labels a recipe, it does not change how one trains'):
            get_recipe(f'default,{label}')


def test_a_teacher_first_recipe_gives_its_jointrd_config_on_the_schedule_its_teacher_trains_by():
    from jointrd_timm.recipes import Schedule
    deep = recipe_for('resnet110_cifar')
    with pytest.raises(ValueError, match=r'give jointrd_config\(schedule=Schedule'):
        deep.jointrd_config()
    mine = Schedule('mine', epochs=10, batch_size=64, lr=0.05, weight_decay=1e-4)
    config = deep.jointrd_config(schedule=mine)
    assert config.joint_step_order == 'teacher_first' and config.teacher_optimizer['lr'] == 0.05
    assert config.teacher_optimizer['weight_decay'] == 1e-4
    assert recipe_for('resnet20_cifar').jointrd_config(schedule=mine) == \
        JointRDConfig.from_dict(recipe_for('resnet20_cifar').run_fields(mine))
