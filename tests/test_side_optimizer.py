"""The side optimizer (methods.side_optimizer): an extra module (a discriminator, a joint teacher) stepped by its own
SGD inside the method's forward, exactly as a hand-written SGD step; and the one Hinton KD."""
import copy

import pytest
import torch
from torch import nn

from jointrd_timm.methods.adversarial import AdversarialTerm, DiscriminatorConfig, LogitDiscriminator
from jointrd_timm.methods.base import hinton_kd
from jointrd_timm.methods.side_optimizer import SideOptimizer


def _sgd_by_hand(params, grads, buffers, lr, momentum, weight_decay, nesterov):
    """torch.optim.SGD's update (dampening 0), written out."""
    for p, g, i in zip(params, grads, range(len(params))):
        d = g + weight_decay * p
        buffers[i] = d.clone() if buffers[i] is None else momentum * buffers[i] + d
        step = d + momentum * buffers[i] if nesterov else buffers[i]
        p -= lr * step


@pytest.mark.parametrize('nesterov', [False, True])
def test_side_optimizer_steps_the_module_as_hand_written_sgd(nesterov):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    by_hand = copy.deepcopy(module)
    settings = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    side = SideOptimizer(module, **settings, cosine_epochs=None, milestones=[], gamma=0.1, nesterov=nesterov)
    assert not any(p.requires_grad for p in module.parameters())  # frozen outside its own step
    buffers = [None] * len(list(by_hand.parameters()))
    for seed in range(3):
        x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        loss, out = side.step(lambda: ((module(x) ** 2).sum(), module(x)))
        expected_loss = (by_hand(x) ** 2).sum()
        grads = torch.autograd.grad(expected_loss, list(by_hand.parameters()))
        with torch.no_grad():
            _sgd_by_hand(list(by_hand.parameters()), grads, buffers, nesterov=nesterov, **settings)
        assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
        assert loss.grad_fn is None and out.grad_fn is None
        for got, want in zip(module.parameters(), by_hand.parameters()):
            assert torch.allclose(got, want, rtol=0, atol=1e-14)
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())


def test_side_optimizer_schedule_catches_up_by_epochs():
    module = nn.Linear(2, 2)
    milestones = SideOptimizer(module, 0.1, 0.9, 0.0, cosine_epochs=None, milestones=[2, 4], gamma=0.1)
    milestones.set_epoch(3)  # two epochs skipped at once (a resume): one milestone passed
    assert milestones.scheduler.last_epoch == 3
    assert milestones.optimizer.param_groups[0]['lr'] == pytest.approx(0.01)
    milestones.set_epoch(1)  # never back
    assert milestones.scheduler.last_epoch == 3
    cosine = SideOptimizer(nn.Linear(2, 2), 0.1, 0.9, 0.0, cosine_epochs=4, milestones=[], gamma=0.1)
    cosine.set_epoch(2)
    assert cosine.optimizer.param_groups[0]['lr'] == pytest.approx(0.05)


def test_the_discriminator_term_is_a_side_optimizer_with_its_config():
    term = AdversarialTerm(LogitDiscriminator(3), DiscriminatorConfig(lr=0.02, momentum=0.5, weight_decay=1e-4,
                                                                      milestones=[1], gamma=0.5))
    group = term.optimizer.param_groups[0]
    assert (group['lr'], group['momentum'], group['weight_decay'], group['nesterov']) == (0.02, 0.5, 1e-4, False)
    assert term.optimizer is term.updates.optimizer and term.scheduler is term.updates.scheduler
    term.set_epoch(1)
    assert term.optimizer.param_groups[0]['lr'] == pytest.approx(0.01)


def test_hinton_kd_is_torchdistills_kd_term():
    """The methods' KD (base.hinton_kd) is the soft term of torchdistill's KDLoss, the loss of the 'kd' baseline's
    YAMLs: KDLoss = alpha CE + (1 - alpha) T^2 KL(softmax(z_T / T) || softmax(z_S / T)) (batch mean)."""
    import torch.nn.functional as F
    from torchdistill.losses.mid_level import KDLoss
    torch.manual_seed(0)
    z_s, z_t, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    kd_loss = KDLoss('.', 'output', '.', 'output', temperature=4.0, alpha=0.9, reduction='batchmean')
    expected = kd_loss({'.': {'output': z_s}}, {'.': {'output': z_t}}, y)
    assert torch.allclose(0.9 * F.cross_entropy(z_s, y) + 0.1 * hinton_kd(z_s, z_t, 4.0), expected, rtol=1e-6)
    p_t, log_p_s = torch.softmax(z_t / 2, 1), torch.log_softmax(z_s / 2, 1)
    by_hand = (p_t * (p_t.log() - log_p_s)).sum(1).mean() * 4
    assert torch.allclose(hinton_kd(z_s, z_t, 2.0), by_hand, rtol=1e-5)


def test_a_side_optimizer_accumulating_two_micro_batches_steps_once_on_their_mean_gradient():
    from jointrd_timm.methods.side_optimizer import SideOptimizer
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    b.load_state_dict(a.state_dict())
    x1, x2 = torch.randn(8, 4), torch.randn(8, 4)
    whole = SideOptimizer(a, lr=0.1, momentum=0.0, weight_decay=0.0, cosine_epochs=None, milestones=[], gamma=0.1)
    whole.step(lambda: (a(torch.cat([x1, x2])) ** 2).mean())  # the batch of 16 in one piece
    parts = SideOptimizer(b, lr=0.1, momentum=0.0, weight_decay=0.0, cosine_epochs=None, milestones=[], gamma=0.1)
    parts.accumulate = 2
    before = b.weight.detach().clone()
    parts.step(lambda: (b(x1) ** 2).mean())
    assert torch.equal(b.weight, before) and parts.pending == 1  # no step after the first micro-batch
    parts.step(lambda: (b(x2) ** 2).mean())
    assert parts.pending == 0 and not b.weight.requires_grad and b.weight.grad is None
    assert torch.allclose(b.weight, a.weight, atol=1e-6) and torch.allclose(b.bias, a.bias, atol=1e-6)
    with pytest.raises(ValueError, match='gradient accumulation steps'):
        parts.accumulate = 0


def test_a_new_stage_freezes_the_methods_modules_and_drops_what_its_optimizers_accumulated():
    import timm
    import jointrd_timm  # noqa: F401
    from jointrd_timm.methods.adversarial import ConditionalAdversarialKD
    torch.manual_seed(0)
    method = ConditionalAdversarialKD(timm.create_model('plain_resnet20_cifar', num_classes=10),
                                      timm.create_model('resnet20_cifar', num_classes=10), num_classes=10)
    method.set_grad_accumulation(2)
    method.train()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    method(x, y)
    updates = method.adversarial.updates
    assert updates.pending == 1 and any(p.grad is not None for p in method.adversarial.discriminator.parameters())
    method.requires_grad_(True)  # what torchdistill's clean_modules does to every parameter
    method.start_stage()
    assert updates.pending == 0 and all(p.grad is None for p in method.adversarial.discriminator.parameters())
    assert not any(p.requires_grad for m in (method.teacher, method.adversarial.discriminator) for p in m.parameters())
    assert all(p.requires_grad for p in method.student.parameters())
