"""The bf16-autocast error of a loss made from student rows and prototype rows, against fp64."""

from __future__ import annotations

from typing import Callable

import torch


def bf16_errors(forms: dict[str, Callable], inputs: torch.Tensor, rows: torch.Tensor, args: tuple,
                exact_args: tuple) -> dict[str, tuple[float, float]]:
    """For each form ``name -> loss(inputs, rows, *args)``: run under CPU bf16 autocast, check that
    the loss and the gradients of ``inputs`` and ``rows`` come out in fp32, and return
    ``(|loss - exact|, max |gradient - exact gradient|)``, the exact values being the last form's
    in fp64 on ``exact_args``."""
    reference = list(forms.values())[-1]
    exact_inputs, exact_rows = inputs.detach().double().requires_grad_(), rows.detach().double().requires_grad_()
    exact = reference(exact_inputs, exact_rows, *exact_args)
    exact_grads = torch.autograd.grad(exact, [exact_inputs, exact_rows])
    errors = {}
    for name, loss_fn in forms.items():
        z, w = inputs.detach().clone().requires_grad_(), rows.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(z, w, *args)
        grads = torch.autograd.grad(loss, [z, w])
        assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
        errors[name] = (abs(float(loss.detach()) - float(exact.detach())),
                        max(float((g.double() - e).abs().max()) for g, e in zip(grads, exact_grads)))
    return errors
