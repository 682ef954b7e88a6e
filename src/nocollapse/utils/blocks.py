"""Row blocks for the passes over B x K matrices.

At the papers' K = 65,536 a 256 x K fp32 matrix is 64 MiB: each elementwise pass over it is
memory traffic, not arithmetic. Working through such a matrix a block of rows at a time, with
every step of one block done before the next block is read, keeps the block in the processor's
cache, so that a chain of elementwise steps costs about one pass over memory instead of one each.
"""

from __future__ import annotations

import torch

# elements of one block of rows (fp32: 1 MiB), the unit the B x K passes work on
BLOCK_ELEMENTS = 1 << 18


def row_blocks(rows: int, width: int, block_elements: int | None = None) -> list[slice]:
    """Consecutive row ranges of a ``rows x width`` matrix, each of about ``block_elements``
    (default ``BLOCK_ELEMENTS``) elements and at least one row."""
    step = max(1, (block_elements or BLOCK_ELEMENTS) // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def column_blocks(rows: int, width: int, block_elements: int | None = None, min_width: int = 256) -> list[slice]:
    """Consecutive column ranges of a ``rows x width`` matrix, each of about ``block_elements``
    elements and at least ``min_width`` columns (so that a product with one block still runs at
    the matrix unit's speed)."""
    step = max(min_width, (block_elements or BLOCK_ELEMENTS) // max(rows, 1), 1)
    return [slice(start, min(start + step, width)) for start in range(0, width, step)]


class ProductGradients:
    """The gradients of a product ``scores = inputs @ weight^T`` (``[N, D]`` by ``[K, D]``),
    built from the scores' gradient one block of columns at a time, so that the whole ``[N, K]``
    gradient never exists: each :meth:`add` of a block ``g = dL/dscores[:, cols]`` adds
    ``g @ weight[cols]`` to the inputs' gradient (accumulated in ``accumulate_dtype``) and writes
    ``g^T @ inputs`` as the rows ``cols`` of the weight's gradient. The products run in
    ``product_dtype``, the forward product's (bf16 under autocast), as the layer's own backward
    pass would; only the gradients asked for are formed."""

    def __init__(self, inputs: torch.Tensor, weight: torch.Tensor, product_dtype: torch.dtype,
                 accumulate_dtype: torch.dtype, need_inputs: bool, need_weight: bool) -> None:
        self.product_dtype, self.inputs_dtype = product_dtype, inputs.dtype
        self.inputs = inputs.detach().to(product_dtype)
        self.weight = weight.detach().to(product_dtype)
        self.inputs_grad = (torch.zeros(inputs.shape, dtype=accumulate_dtype, device=inputs.device)
                            if need_inputs else None)
        self.weight_grad = (torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
                            if need_weight else None)

    def add(self, block_grad: torch.Tensor, cols: slice) -> None:
        """Take in ``dL/dscores[:, cols]``."""
        g = block_grad.to(self.product_dtype)
        if self.inputs_grad is not None:
            self.inputs_grad += (g @ self.weight[cols]).to(self.inputs_grad.dtype)
        if self.weight_grad is not None:
            self.weight_grad[cols] = (g.t() @ self.inputs).to(self.weight_grad.dtype)

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(dL/dinputs, dL/dweight)`` in the dtypes of the inputs and the weight (None where not asked)."""
        inputs_grad = None if self.inputs_grad is None else self.inputs_grad.to(self.inputs_dtype)
        return inputs_grad, self.weight_grad
