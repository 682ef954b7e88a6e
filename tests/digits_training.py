"""A few dozen training steps on digits through the engine's own pieces, for the failure-switch
tests of the baselines: the test split's projections afterwards and the last step's logs.

    z, logs = train_on_digits(["method.name=vicreg", ...], steps=40)
"""

from __future__ import annotations

import torch

from nocollapse.config import build_config
from nocollapse.methods import build_method
from nocollapse.models.backbones import build_backbone


def train_on_digits(overrides: list[str], steps: int = 40, lr: float = 0.3, seed: int = 0):
    """``steps`` steps on digits at a constant ``lr`` (weight decay 1e-5), one thread, then the
    test split's projections (eval mode) and the last step's logs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # a small model: more threads only contend
    try:
        return _train(overrides, steps, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _train(overrides, steps, lr, seed):
    from nocollapse.data.loader import TrainBatches, eval_batches
    from nocollapse.data.registry import image_size_of, load_dataset
    from nocollapse.data.views import build_view_spec
    from nocollapse.engine.trainer import optimisation_step
    from nocollapse.utils.optim import build_optimizer

    cfg, _ = build_config(overrides=list(overrides))
    splits = load_dataset(cfg.data)
    size = image_size_of(cfg, splits)
    cpu = torch.device("cpu")
    batches = TrainBatches(splits.ssl_train, build_view_spec(cfg.views, size, splits.mean, splits.std),
                           cfg.train.batch_size, seed, cpu)
    torch.manual_seed(seed)
    method = build_method(cfg, build_backbone(cfg.model, size), len(batches))
    optimizer = build_optimizer(cfg.optim, method.parameter_groups())
    step, epoch = 0, 0
    while step < steps:
        for batch in batches.epoch(epoch):
            _, out = optimisation_step(method, method, optimizer, batch, step, lr, 1e-5)
            step += 1
            if step == steps:
                break
        epoch += 1
    method.eval()
    with torch.no_grad():
        z = torch.cat([method.eval_encoder()([x])[1]
                       for x, _ in eval_batches(splits.test, size, splits.mean, splits.std, 256, cpu)])
    return z, out.logs
