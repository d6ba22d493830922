"""Meta-Curvature (Park & Oliva, NeurIPS 2019): learned Kronecker-factored gradient preconditioners."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffopt.optim.rule import UpdateRule, tensor_map


class MetaCurvature(UpdateRule):
    """Transforms each inner gradient G before the step (chain it with a step-size rule).

    - linear weight G [out, in]:            G' = M_out G M_in
    - conv weight G [out, in, k1, k2]:      G' = G x1 M_out x2 M_in x3 M_filter, with G viewed as
      [out, in, k1*k2] and x_n the mode-n product (G x1 M)[a, i, f] = sum_o M[a, o] G[o, i, f]
    - anything else (biases, norms):        G' = m * G, element-wise, m of G's shape

    All factors start at the identity (m at ones), so the initial rule is plain SGD; they take the
    dtype and device of ``params`` (the tensors the rule will update). Shared across inner steps.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.factors = nn.ModuleList()
        for param in params:
            shape, like = param.shape, dict(dtype=param.dtype, device=param.device)
            if len(shape) == 2:
                dims = (shape[0], shape[1])
            elif len(shape) == 4:
                dims = (shape[0], shape[1], shape[2] * shape[3])
            else:
                dims = ()
            matrices = [nn.Parameter(torch.eye(d, **like)) for d in dims] or [
                nn.Parameter(torch.ones(shape, **like))]
            self.factors.append(nn.ParameterList(matrices))

    def update(self, grads, state, params, step):
        def precondition(i, g):
            factors = list(self.factors[i])
            if g.dim() == 2:
                m_out, m_in = factors
                return m_out @ g @ m_in
            if g.dim() == 4:
                m_out, m_in, m_filter = factors
                # one mode product at a time: a single four-operand einsum contracts left to
                # right through an [out, out, in, in, k, k] outer product (5 GB for 64 filters)
                out = torch.einsum("ao,oif->aif", m_out, g.flatten(2))
                out = torch.einsum("bi,aif->abf", m_in, out)
                return (out @ m_filter.T).view_as(g)
            return factors[0] * g

        return tensor_map(precondition, grads), state
