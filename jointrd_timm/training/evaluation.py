"""Evaluation inside a run: top-1 over a loader gathered across processes, BatchNorm statistics recomputed for the
deployed network, the replicas' agreement at the end of a multi-process run, and the training accuracy's tap on
the model's output."""
import torch
from torch import nn

__all__ = ['evaluate', 'recalibrate_batchnorm', 'replica_divergence']


def _logits(output):
    return output['logits'] if isinstance(output, dict) else output


class _OutputTap:
    """Keeps the last logits of a model's forward, for the running training accuracy."""

    def __init__(self, model: nn.Module):
        self.logits = None
        model.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.logits = _logits(output).detach() if module.training else None


@torch.no_grad()
def evaluate(model: nn.Module, data_loader, accelerator) -> float:
    """Top-1 accuracy (%) over the whole loader, gathered over processes."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, targets in data_loader:
        preds = _logits(model(images)).argmax(1)
        preds, targets = accelerator.gather_for_metrics((preds, targets))
        correct += int((preds == targets).sum())
        total += int(targets.numel())
    model.train(was_training)
    return 100.0 * correct / max(1, total)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data_loader, batches: int, accelerator=None, seed: int = 0) -> int:
    """Recompute the running statistics of every BatchNorm in ``model`` as the plain average over ``batches``
    batches of ``data_loader`` (all of it when shorter), the other modules in eval mode (no dropout, no stochastic
    depth), no gradients. The data order and augmentations are drawn from a generator seeded with ``seed`` and the
    global RNG is left as it was, so the result is reproducible and training is not disturbed. With several
    processes each one averages its shard and the statistics are then averaged over processes. Returns the number
    of batches used (0 when the model has no BatchNorm)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or batches <= 0:
        return 0
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    used = 0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for batch in data_loader:
                if used >= batches:
                    break
                model(batch[0])
                used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        for m in norms:
            m.running_mean.copy_(accelerator.reduce(m.running_mean.clone(), 'mean'))
            m.running_var.copy_(accelerator.reduce(m.running_var.clone(), 'mean'))
    return used


def replica_divergence(module: nn.Module) -> float:
    """Largest |difference| between any parameter on this process and on process 0 (0.0 when single-process).
    DDP keeps the student in step; the discriminators' own optimizers stay in step only because their gradients
    are all-reduced, so this is checked at the end of every multi-process run."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    worst = torch.zeros(())
    for p in module.parameters():
        reference = p.detach().clone()
        dist.broadcast(reference, 0)
        worst = torch.maximum(worst, (p.detach() - reference).abs().max().float().cpu())
    worst = worst.to(next(module.parameters()).device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)
