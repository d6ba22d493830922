"""Write your own meta-learned inner-loop rule in one short class, check its meta-gradient, train it.

    python examples/custom_rule.py --iterations 300
    python examples/custom_rule.py --gradcheck_only

The rule below is learned momentum: each parameter tensor gets a learned step size alpha and a
learned momentum coefficient beta = sigmoid(b), and keeps a velocity across inner steps:

    v_t = beta * v_{t-1} + g_t,        update_t = -alpha * v_t

Everything a new rule needs:
1. subclass ``diffopt.optim.UpdateRule`` (an ``nn.Module``): its ``nn.Parameter``s are what MAML
   meta-learns, and checkpoints save them;
2. ``init(params)`` returns the state an unroll starts from (here, zero velocities);
3. ``update(grads, state, params, step)`` returns ``(updates, new_state)``, new weights being
   ``params + updates``; use plain differentiable torch ops, and pass None gradients through
   (``tensor_map`` does both).
higher differentiates it through ``InnerLoop``, so the meta-gradient reaches alpha and b, and
``check_meta_gradient`` verifies that against finite differences.

From the command line, the rule is ``custom_rule:LearnedMomentum`` (``module:attribute``; run
from this folder, or put it on PYTHONPATH): every command takes it where it takes a rule name,
and config.json records it, so evaluate and resume rebuild the run in a new process::

    cd examples
    diffopt gradcheck --inner_optimizer custom_rule:LearnedMomentum
    diffopt compare --algorithms maml,reptile --inner_optimizers sgd,custom_rule:LearnedMomentum \
        --iterations 300 --out runs/learned-momentum
    diffopt evaluate runs/learned-momentum/runs/maml+custom_rule:LearnedMomentum-k5-seed0

(compare lists reptile x LearnedMomentum as skipped: Reptile does not meta-learn a rule.)
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from diffopt import MAML, Episode, InnerLoop, check_meta_gradient, evaluate, get_dataset
from diffopt.firecli import fire_checked
from diffopt.models import MLP
from diffopt.optim import UpdateRule
from diffopt.optim.rule import tensor_map


class LearnedMomentum(UpdateRule):
    """Per-tensor learned step size and momentum; both start as SGD with momentum 0.5."""

    def __init__(self, params, lr: float) -> None:
        super().__init__()
        self.alpha = nn.Parameter(params[0].new_full((len(params),), lr))
        self.b = nn.Parameter(params[0].new_zeros(len(params)))  # beta = sigmoid(0) = 0.5

    def init(self, params):
        return [torch.zeros_like(p) for p in params]

    def update(self, grads, state, params, step):
        beta = torch.sigmoid(self.b)
        velocity = tensor_map(lambda i, g, v: beta[i] * v + g, grads, state)
        velocity = [v if v is not None else old for v, old in zip(velocity, state, strict=True)]
        return tensor_map(lambda i, g, v: -self.alpha[i] * v, grads, velocity), velocity


def make_learner(hidden: tuple[int, ...], activation: str, lr: float, inner_steps: int,
                 seed: int) -> MAML:
    torch.manual_seed(seed)
    model = MLP(1, 1, hidden=hidden, activation=activation)
    rule = LearnedMomentum(list(model.parameters()), lr)
    return MAML(model, InnerLoop(rule, steps=inner_steps), get_dataset("sinusoid").loss)


def main(iterations: int = 300, shots: int = 10, inner_steps: int = 2, lr: float = 0.01,
         meta_batch_size: int = 25, eval_tasks: int = 200, seed: int = 0,
         gradcheck_only: bool = False) -> None:
    """Gradcheck the rule, then meta-train MAML with it on Sinusoid and evaluate."""
    sinusoid = get_dataset("sinusoid")
    # A small smooth network and two tasks suit finite differences (float64 inside the check).
    two_tasks = sinusoid.loader("train", seed=seed, shots=shots, test_shots=shots, batch_size=2,
                                num_tasks=2)
    check = check_meta_gradient(make_learner((8,), "tanh", 0.1, inner_steps, seed),
                                Episode.from_torchmeta(next(iter(two_tasks))))
    print(f"gradcheck: worst relative error {check.max_rel_error:.2e} "
          f"(alpha: {check.per_parameter['inner.rule.alpha'].rel_error:.2e}, "
          f"b: {check.per_parameter['inner.rule.b'].rel_error:.2e})")
    if gradcheck_only:
        return

    learner = make_learner((40, 40), "relu", lr, inner_steps, seed)
    loader = sinusoid.loader("train", seed=seed, shots=shots, test_shots=shots,
                             batch_size=meta_batch_size, num_tasks=iterations * meta_batch_size)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    for batch in tqdm(loader, total=iterations, desc="maml + learned momentum"):
        optimizer.zero_grad()
        learner.meta_gradient(Episode.from_torchmeta(batch))
        optimizer.step()
    rule = learner.inner.rule
    print("learned alpha:", [round(a, 4) for a in rule.alpha.tolist()])
    print("learned beta: ", [round(b, 3) for b in torch.sigmoid(rule.b).tolist()])
    result = evaluate(learner, sinusoid, shots=shots, test_shots=100, tasks=eval_tasks,
                      steps=(0, inner_steps))
    for steps in sorted(result.scores):
        mean, ci = result.summary(steps)
        print(f"MSE after {steps} inner steps: {mean:.3f} +- {ci:.3f} ({eval_tasks} tasks)")


if __name__ == "__main__":
    fire_checked(main)
