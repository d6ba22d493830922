"""Independent plain-PyTorch Reptile, MAML and first-order MAML for Omniglot N-way K-shot.

A reference to run side by side with diffopt for a fixed wall-clock budget, to check its accuracy
and speed. It shares no code with diffopt: everything below was written from the original code,
openai/supervised-reptile (Reptile) and cbfinn/maml (MAML, first-order MAML with ``--stop_grad``),
cited as ``file:line`` of those repositories.

Data: torchmeta's prepared folder ``DATA_ROOT/omniglot`` (``data.hdf5`` with uint8 [20, 105, 105]
arrays, strokes 255, and the Vinyals split ``vinyals_train_labels.json``). Each character is also
rotated by 90/180/270 degrees counter-clockwise as new classes, class index ``rot * C + char``
(torchmeta's ``Rotation([90, 180, 270])`` class augmentation through torchvision's PIL ``rotate``,
a plain transpose for multiples of 90; rotated before the resize, like torchmeta), then resized
once with torchvision ``Resize(28)`` + ``ToTensor`` (strokes 1, like the inverted images of
cbfinn/maml data_generator.py:118). The whole split is held as one [classes, 20, 1, 28, 28] tensor.
Tasks: ``ways`` distinct classes and per class distinct examples, all without replacement, labels
in random order (reptile.py:210-221, data_generator.py:95-97), drawn with a seeded torch.Generator.

Reptile (``--shots 1 --inner-batch 10 --inner-iters 5 --meta-step 1 --meta-batch 5
--eval-batch 5 --eval-iters 50 --learning-rate 0.001 --meta-step-final 0 --train-shots 10``,
README.md:50; the transductive variant README.md:35):
- model models.py:13-30: 4 x [conv 64 3x3 stride 2 'same', batch norm with training=True (batch
  statistics always, epsilon 1e-3, gamma and beta), ReLU], flatten (TF's NHWC order), dense to
  ``ways`` logits; TF default initialisers (glorot uniform kernels, zero biases); the loss is the
  per-example softmax cross-entropy vector (models.py:27-28), whose ``minimize`` (models.py:30)
  follows the gradient of its sum over the mini-batch (not the mean; Adam makes the two the same
  up to epsilon). The logged loss is the mean.
- inner optimiser models.py:10: Adam(beta1=0, beta2=0.999, epsilon=1e-8) with TF's update rule
  (epsilon added to sqrt(v) before the bias correction of the step size). Its moments and step
  count persist across tasks in meta-training: train_step saves and restores only the trainable
  variables (reptile.py:24, 62-72); evaluation saves and restores the full state (reptile.py:25,
  114, 122). The snapshot carries the Adam state so evaluation starts from it.
- one meta-iteration reptile.py:62-74: 5 tasks of 10 examples per class, 5 inner steps on
  mini-batches of 10 from ``_mini_batches`` (reptile.py:223-248: shuffle, reshuffle when
  exhausted, batches may span reshuffles), then old + eps * (mean(new) - old), eps annealed
  linearly from 1 to 0 (train.py:54-55) over max(fraction of the budget, fraction of meta_iters).
- evaluation reptile.py:112-134: 50 Adam steps on mini-batches of 5 of the support set, then each
  query predicted in one batch with the whole support set (``_test_predictions``), or all queries
  in one batch when transductive. Weight decay rate 1 (args.py:37) is a no-op, left out.

MAML / first-order MAML (``--datasource=omniglot --metatrain_iterations=60000
--meta_batch_size=32 --update_batch_size=1 --update_lr=0.4 --num_updates=1``, main.py:11):
- model maml.py:185-225, utils.py:26-41: 4 x [conv 64 3x3 stride 2 'SAME' + bias,
  tf.contrib batch_norm (center=True, scale=False: no gamma, epsilon 1e-3, is_training=True so
  batch statistics always), ReLU], mean over the spatial positions (maml.py:223), dense 64 ->
  ``ways`` with w5 ~ N(0, 1) (maml.py:206, tf.random_normal) and zero biases; conv weights xavier
  uniform (maml.py:189), conv biases zero.
- the inner step differentiates only ``weights`` (convs and dense, maml.py:90), so the batch-norm
  offsets are learnt by the meta-optimiser only (maml.py:145-146: Adam over all trainable
  variables); first-order = stop_gradient on the inner gradients (maml.py:91-92).
- losses: xent = per-example softmax cross-entropy / update_batch_size (utils.py:56-58), the inner
  gradient is that of its sum over the support set (tf.gradients of a vector); the meta-loss is the
  sum over tasks and query examples / meta_batch_size (maml.py:135-136); Adam(1e-3) (maml.py:145,
  main.py:50); the query holds update_batch_size examples per class like the support
  (main.py:251: DataGenerator(update_batch_size * 2)).
- tasks of a meta-batch are independent (tf.map_fn, maml.py:127); here they run as one batched
  computation (grouped convolutions, per-task batch-norm statistics): the same sums up to rounding.
- evaluation main.py:165-201, 230: test_num_updates = 10 SGD steps, lr update_lr on the full
  support set, queries in one batch (transductive: batch-norm statistics of the query set), accuracy
  mean and ci95 = 1.96 * std / sqrt(T).

TF 'SAME' padding with stride 2 pads (total = max((ceil(n/2) - 1) * 2 + 3 - n, 0)) with the extra
row/column at the bottom/right; replicated with F.pad then an unpadded convolution.

Deliberate differences with the originals: both use the Vinyals meta-train characters with
rotations as fixed classes (supervised-reptile: a random 1200/423 split, omniglot.py:37-63;
cbfinn/maml: 1100 training characters each rotated at random per task, data_generator.py:46-55,
138-150, also at test time); torchmeta's images (inverted, bilinear antialiased resize) instead
of theirs (supervised-reptile omniglot.py:94 reads the 1-bit PNGs un-inverted, strokes 0, and PIL
resizes 1-bit images nearest-neighbour; cbfinn/maml resize_images.py uses LANCZOS, then inverts);
the wall-clock budget in place of a number of iterations; no evaluation during training (the
original's every-10-iterations evaluation restores the full state, so it does not change training).

Run (from the repository root):
    python benchmarks/omniglot_reference.py train reptile --out runs/reptile --budget_seconds 600 \\
        --data_root data
    python benchmarks/omniglot_reference.py evaluate reptile runs/reptile/snapshot-5.pt tasks.pt \\
        --out runs/reptile/eval.json
``tasks.pt``: dict of support_x [T, N, 1, 28, 28], support_y [T, N], query_x [T, M, 1, 28, 28],
query_y [T, M] (float images in [0, 1], int64 labels).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import fire
import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import Resize, ToTensor

Params = dict[str, torch.Tensor]
ALGORITHMS = ("reptile", "maml", "fomaml")
REPTILE = {"train_shots": 10, "inner_batch": 10, "inner_iters": 5, "meta_batch": 5, "lr": 1e-3,
           "meta_step": 1.0, "meta_step_final": 0.0, "meta_iters": 100_000}
MAML = {"inner_lr": 0.4, "inner_steps": 1, "meta_lr": 1e-3, "meta_iters": 60_000}
BN_EPSILON = 1e-3  # tf.layers.batch_normalization and tf.contrib.layers.batch_norm defaults
MAML_RECIPES = {
    "cbfinn": dict(meta_batch=32, queries=None, inner_loss="sum", init="tf", head="mean", bn_scale=False,
                   bn_eps=BN_EPSILON, adapt_norm=False, meta_loss="sum", meta_lr_final=None, step_sizes=None,
                   classes="train"),
    "goal": dict(meta_batch=8, queries=15, inner_loss="mean", init="torch", head="flatten_chw",
                 bn_scale=True, bn_eps=1e-5, adapt_norm=True, meta_loss="mean", meta_lr_final=1e-5,
                 step_sizes=None, classes="train"),
}
MAML_RECIPES["goal-lslr"] = {**MAML_RECIPES["goal"], "step_sizes": "tensor"}
MAML_RECIPES["goal-meta-sgd"] = {**MAML_RECIPES["goal"], "step_sizes": "element"}
MAML_RECIPES["goal-lslr-trainval"] = {**MAML_RECIPES["goal-lslr"], "classes": "trainval"}
"""MAML's settings: ``cbfinn`` (the original's, above); ``goal``: the recipe of diffopt's Omniglot
goal and paper tables (examples/omniglot_table.py), each lever written here independently: the
inner loss is each task's mean cross-entropy (not the sum / shots), PyTorch's default initialisers
(conv and dense weights and biases U(+-1/sqrt(fan_in))), the last feature map flattened in
channel-height-width order (256 features), batch norm with a scale (gamma) and epsilon 1e-5, its
scale and offset adapted in the inner loop too, 15 query images per class, 8 tasks per meta-batch,
the meta-loss the mean query cross-entropy, and the meta learning rate annealed along a cosine from
1e-3 to 1e-5 over the budget (the fraction of the budget or of meta_iters done, whichever is
further). ``goal-lslr`` and ``goal-meta-sgd``: the goal recipe with the inner step sizes learned
too, one per adapted tensor (MAML++'s LSLR with its one training step: Antoniou et al. 2019) or one
per adapted element (Meta-SGD: Li et al. 2017), each starting at the inner learning rate and moved
by the same Adam as the weights; at test every step takes the learned step sizes.
``goal-lslr-trainval``: ``goal-lslr`` meta-trained on Vinyals' training and validation characters
(1200, ``classes="trainval"``), the test characters unchanged."""


# ----------------------------------------------------------------------------------------- data
def load_split(data_root: str, split: str = "train", rotations: bool = True) -> torch.Tensor:
    """[classes, 20, 1, 28, 28] float images in [0, 1]; class rot * C + char is char rotated rot * 90.
    ``split``: Vinyals' train, val or test characters, or trainval (train and val)."""
    root = Path(data_root) / "omniglot"
    characters = [label for name in (("train", "val") if split == "trainval" else (split,))
                  for label in json.loads((root / f"vinyals_{name}_labels.json").read_text())]
    resize, to_tensor = Resize(28), ToTensor()
    with h5py.File(root / "data.hdf5", "r") as file:
        arrays = [file["/".join(name)][()] for name in characters]
    classes = []
    for rot in range(4 if rotations else 1):
        for array in arrays:  # PIL rotate by k * 90 degrees (counter-clockwise) is np.rot90(k)
            images = np.rot90(array, rot, axes=(1, 2))
            classes.append(torch.stack([to_tensor(resize(Image.fromarray(np.ascontiguousarray(im))))
                                        for im in images]))
    return torch.stack(classes)


def sample_tasks(data: torch.Tensor, tasks: int, ways: int, per_class: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tasks, ways, per_class, 1, 28, 28] and labels [tasks, ways, per_class]; label = draw order."""
    classes = torch.multinomial(torch.ones(tasks, data.shape[0]), ways, generator=gen)
    examples = torch.multinomial(torch.ones(tasks * ways, data.shape[1]), per_class, generator=gen)
    x = data[classes.reshape(-1, 1), examples].view(tasks, ways, per_class, *data.shape[2:])
    y = torch.arange(ways).view(1, ways, 1).expand(tasks, ways, per_class)
    return x, y


def mini_batches(n: int, batch_size: int, num_batches: int, gen: torch.Generator) -> list[torch.Tensor]:
    """supervised-reptile ``_mini_batches`` without replacement: batches may span reshuffles."""
    batches: list[torch.Tensor] = []
    current: list[int] = []
    while True:
        for i in torch.randperm(n, generator=gen).tolist():
            current.append(i)
            if len(current) == batch_size:
                batches.append(torch.tensor(current))
                current = []
                if len(batches) == num_batches:
                    return batches


# ---------------------------------------------------------------------------------------- model
def init_params(algorithm: str, ways: int, gen: torch.Generator, recipe: str = "cbfinn") -> Params:
    """Reptile's (glorot, zero biases, batch-norm scale, a 256-feature dense layer) or MAML's recipe's."""
    def uniform(shape: tuple[int, ...], limit: float) -> torch.Tensor:
        return torch.empty(shape).uniform_(-limit, limit, generator=gen)

    def glorot(shape: tuple[int, ...], fan_in: int, fan_out: int) -> torch.Tensor:
        return uniform(shape, math.sqrt(6.0 / (fan_in + fan_out)))

    settings = MAML_RECIPES[recipe]
    torch_init = algorithm != "reptile" and settings["init"] == "torch"
    params: Params = {}
    c_in = 1
    for i in range(1, 5):
        if torch_init:  # nn.Conv2d.reset_parameters: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
            params[f"conv{i}.weight"] = uniform((64, c_in, 3, 3), 1 / math.sqrt(c_in * 9))
            params[f"conv{i}.bias"] = uniform((64,), 1 / math.sqrt(c_in * 9))
        else:
            params[f"conv{i}.weight"] = glorot((64, c_in, 3, 3), c_in * 9, 64 * 9)
            params[f"conv{i}.bias"] = torch.zeros(64)
        if algorithm == "reptile" or settings["bn_scale"]:
            params[f"bn{i}.weight"] = torch.ones(64)
        params[f"bn{i}.bias"] = torch.zeros(64)
        c_in = 64
    if algorithm == "reptile":
        params["fc.weight"] = glorot((ways, 256), 256, ways)
    elif torch_init:  # nn.Linear.reset_parameters
        features = 256 if settings["head"] != "mean" else 64
        params["fc.weight"] = uniform((ways, features), 1 / math.sqrt(features))
    else:
        params["fc.weight"] = torch.randn(ways, 64, generator=gen)
    params["fc.bias"] = uniform((ways,), 1 / math.sqrt(params["fc.weight"].shape[1])) if torch_init \
        else torch.zeros(ways)
    if algorithm != "reptile" and settings["step_sizes"] is not None:  # learned step sizes "lr.<name>"
        for name in adapted(list(params), recipe):
            shape = () if settings["step_sizes"] == "tensor" else params[name].shape
            params[f"lr.{name}"] = torch.full(shape, MAML["inner_lr"])
    return {name: p.requires_grad_() for name, p in params.items()}


def adapted(names: list[str], recipe: str) -> list[str]:
    """The parameters MAML's inner loop moves: all (goal) or all but batch norm's (cbfinn)."""
    adapt_norm = MAML_RECIPES[recipe]["adapt_norm"]
    return [n for n in names if not n.startswith("lr.") and (adapt_norm or not n.startswith("bn"))]


def same_pad(h: torch.Tensor) -> torch.Tensor:
    """TF 'SAME' padding for a 3x3 stride-2 convolution: the odd pixel goes bottom/right."""
    total = max((math.ceil(h.shape[-1] / 2) - 1) * 2 + 3 - h.shape[-1], 0)
    return F.pad(h, (total // 2, total - total // 2, total // 2, total - total // 2))


def forward(params: Params, x: torch.Tensor, head: str, eps: float = BN_EPSILON) -> torch.Tensor:
    """G independent models (params with a leading dim G) on x [B, G, 1, 28, 28] -> logits [B, G, ways].

    Batch-norm statistics are per model over its B examples (grouped convolution, channels g * 64 + c).
    head: ``mean`` over the spatial positions, or the last map flattened, ``flatten`` in TF's
    height-width-channel order or ``flatten_chw`` in PyTorch's channel-height-width order.
    """
    b, g = x.shape[:2]
    h = x.reshape(b, g * x.shape[2], *x.shape[3:])
    for i in range(1, 5):
        w = params[f"conv{i}.weight"]
        h = F.conv2d(same_pad(h), w.reshape(-1, *w.shape[2:]), params[f"conv{i}.bias"].reshape(-1),
                     stride=2, groups=g)
        gamma = params.get(f"bn{i}.weight")
        h = F.batch_norm(h, None, None, None if gamma is None else gamma.reshape(-1),
                         params[f"bn{i}.bias"].reshape(-1), training=True, eps=eps)
        h = F.relu(h)
    h = h.view(b, g, 64, *h.shape[2:])
    features = {"mean": lambda: h.mean((3, 4)), "flatten": lambda: h.permute(0, 1, 3, 4, 2).reshape(b, g, -1),
                "flatten_chw": lambda: h.reshape(b, g, -1)}[head]()
    return torch.einsum("bgf,gof->bgo", features, params["fc.weight"]) + params["fc.bias"]


def tf_adam_(params: list[torch.Tensor], grads: list[torch.Tensor], state: dict, lr: float,
             beta1: float, beta2: float = 0.999, eps: float = 1e-8) -> None:
    """tf.train.AdamOptimizer, in place: p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)."""
    state["step"] += 1
    t = state["step"]
    lr_t = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
    m, v = state["m"], state["v"]
    with torch.no_grad():
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, grads, alpha=1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, m, denom, value=-lr_t)


def new_adam(params: list[torch.Tensor]) -> dict:
    return {"step": 0, "m": [torch.zeros_like(p) for p in params], "v": [torch.zeros_like(p) for p in params]}


# ----------------------------------------------------------------------------------- algorithms
def reptile_step(params: Params, adam: dict, data: torch.Tensor, ways: int, meta_step: float,
                 gen: torch.Generator) -> float:
    """One Reptile meta-iteration (reptile.py:62-74); the inner Adam state persists. Returns mean loss."""
    plist = list(params.values())
    old = [p.detach().clone() for p in plist]
    new_sum = [torch.zeros_like(p) for p in plist]
    loss_sum = torch.zeros(())
    for _ in range(REPTILE["meta_batch"]):
        x, y = sample_tasks(data, 1, ways, REPTILE["train_shots"], gen)
        x, y = x.reshape(-1, 1, *x.shape[3:]), y.reshape(-1)  # [50, G=1, 1, 28, 28]
        for idx in mini_batches(len(y), REPTILE["inner_batch"], REPTILE["inner_iters"], gen):
            logits = forward({n: p.unsqueeze(0) for n, p in params.items()}, x[idx], "flatten")[:, 0]
            loss = F.cross_entropy(logits, y[idx], reduction="sum")  # models.py:27-30: sum of a vector
            tf_adam_(plist, list(torch.autograd.grad(loss, plist)), adam, REPTILE["lr"], beta1=0.0)
            loss_sum += loss.detach() / len(idx)
        with torch.no_grad():
            torch._foreach_add_(new_sum, plist)
            torch._foreach_copy_(plist, old)  # only the trainable variables are reset
    with torch.no_grad():  # old + eps * (mean(new) - old)
        torch._foreach_mul_(new_sum, meta_step / REPTILE["meta_batch"])
        torch._foreach_add_(new_sum, old, alpha=1 - meta_step)
        torch._foreach_copy_(plist, new_sum)
    return loss_sum.item() / (REPTILE["meta_batch"] * REPTILE["inner_iters"])


def maml_adapt(params: Params, xs: torch.Tensor, ys: torch.Tensor, steps: int, lr: float, shots: int,
               create_graph: bool, track: bool, recipe: str = "cbfinn") -> Params:
    """SGD on each task's support set (xs [G, N, ...]); params -> fast weights with a leading dim G.

    cbfinn: the inner loss is the sum of the cross-entropies / shots (utils.py:56-58); batch-norm
    offsets are not adapted (maml.py:90). goal: each task's mean cross-entropy, every parameter
    adapted. With learned step sizes (params "lr.<name>") those replace ``lr``. track=False
    detaches each step (evaluation: no meta-gradient needed)."""
    settings = MAML_RECIPES[recipe]
    g = xs.shape[0]
    fast = {n: p.unsqueeze(0).expand(g, *p.shape) for n, p in params.items() if not n.startswith("lr.")}
    inner = adapted(list(fast), recipe)
    step_size = {n: params[f"lr.{n}"] if settings["step_sizes"] else lr for n in inner}
    if not track:
        fast = {n: p.detach().clone().requires_grad_(n in inner) for n, p in fast.items()}
    x, y = xs.transpose(0, 1), ys.transpose(0, 1)
    divisor = xs.shape[1] if settings["inner_loss"] == "mean" else shots  # tasks are summed: each its own
    for _ in range(steps):
        logits = forward(fast, x, settings["head"], settings["bn_eps"])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum") / divisor
        grads = torch.autograd.grad(loss, [fast[n] for n in inner], create_graph=create_graph)
        with torch.set_grad_enabled(track):
            fast = {**fast, **{n: fast[n] - step_size[n] * gr for n, gr in zip(inner, grads, strict=True)}}
        if not track:
            fast = {n: p.requires_grad_(n in inner) for n, p in fast.items()}
    return fast


def maml_step(params: Params, adam: dict, data: torch.Tensor, ways: int, shots: int, first_order: bool,
              gen: torch.Generator, recipe: str = "cbfinn", meta_lr: float = MAML["meta_lr"]) -> float:
    """One (first-order) MAML meta-iteration (maml.py:79-149). Returns the mean query cross-entropy."""
    settings = MAML_RECIPES[recipe]
    tasks, queries = settings["meta_batch"], settings["queries"] or shots
    x, y = sample_tasks(data, tasks, ways, shots + queries, gen)  # support + query per class
    xs, xq = x[:, :, :shots].flatten(1, 2), x[:, :, shots:].flatten(1, 2)
    ys, yq = y[:, :, :shots].flatten(1, 2), y[:, :, shots:].flatten(1, 2)
    fast = maml_adapt(params, xs, ys, MAML["inner_steps"], MAML["inner_lr"], shots,
                      create_graph=not first_order, track=True, recipe=recipe)
    logits = forward(fast, xq.transpose(0, 1), settings["head"], settings["bn_eps"])
    losses = F.cross_entropy(logits.reshape(-1, ways), yq.transpose(0, 1).reshape(-1), reduction="none")
    if settings["meta_loss"] == "mean":
        meta_loss = losses.mean()
    else:  # maml.py:136
        meta_loss = losses.sum() / shots / tasks
    plist = list(params.values())
    tf_adam_(plist, list(torch.autograd.grad(meta_loss, plist)), adam, meta_lr, beta1=0.9)
    return losses.mean().item()


def cosine(start: float, final: float, fraction: float) -> float:
    """A cosine from ``start`` at fraction 0 to ``final`` at 1 (MAML++'s CosineAnnealingLR)."""
    return final + (start - final) * (1 + math.cos(math.pi * min(max(fraction, 0.0), 1.0))) / 2


# ----------------------------------------------------------------------------------------- train
def train(algorithm: str, out: str, budget_seconds: float, data_root: str = "data", seed: int = 0,
          snapshots: int = 5, ways: int = 5, shots: int = 1, threads: int = 1,
          meta_iters: int | None = None, recipe: str = "cbfinn", resume: bool = False) -> dict:
    """Train for budget_seconds of training time; write log.jsonl, snapshot-{k}.pt, summary.json.

    The training clock counts only the meta-iterations (task sampling included), not the data loading,
    logging or snapshot writing. The logged loss is the mean cross-entropy per example: of the inner
    mini-batches (Reptile), of the queries after adaptation (MAML, FOMAML). Snapshot k is written when
    the training clock first passes k * budget / snapshots (all remaining ones if meta_iters ends first).
    ``recipe``: MAML's settings (``MAML_RECIPES``). ``resume``: continue from the last snapshot (its
    weights, optimiser state, clock and task generator), so a budget can span several sittings.
    """
    assert algorithm in ALGORITHMS, algorithm
    assert recipe in MAML_RECIPES and (recipe == "cbfinn" or algorithm != "reptile"), recipe
    torch.set_num_threads(threads)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_split(data_root, MAML_RECIPES[recipe]["classes"], rotations=True)
    gen = torch.Generator().manual_seed(seed)
    params = init_params(algorithm, ways, gen, recipe)
    adam = new_adam(list(params.values()))
    meta_iters = meta_iters or (REPTILE if algorithm == "reptile" else MAML)["meta_iters"]
    adam_key = "adam" if algorithm == "reptile" else "meta_adam"
    train_seconds, durations, next_k, first = 0.0, [], 1, 0
    done = sorted(out_dir.glob("snapshot-*.pt"), key=lambda p: int(p.stem.split("-")[1])) if resume else []
    if done:
        last = torch.load(done[-1], weights_only=True)
        assert (last["algorithm"], last.get("recipe", "cbfinn")) == (algorithm, recipe), done[-1]
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(last["model"][name])
        adam = {"step": last[adam_key]["step"], "m": [last[adam_key]["m"][n].clone() for n in params],
                "v": [last[adam_key]["v"][n].clone() for n in params]}
        gen.set_state(last["generator"])
        train_seconds, first, next_k = last["train_seconds"], last["iteration"], len(done) + 1
    start = time.perf_counter() - train_seconds
    if done:  # the iterations logged after the last snapshot are redone
        lines = (out_dir / "log.jsonl").read_text().splitlines()[:first]
        (out_dir / "log.jsonl").write_text("".join(line + "\n" for line in lines))
    with open(out_dir / "log.jsonl", "a" if done else "w") as log:
        for it in range(first, meta_iters):
            if train_seconds >= budget_seconds:
                break
            t0 = time.perf_counter()
            frac = max(train_seconds / budget_seconds, it / meta_iters)
            if algorithm == "reptile":
                meta_step = frac * REPTILE["meta_step_final"] + (1 - frac) * REPTILE["meta_step"]
                loss = reptile_step(params, adam, data, ways, meta_step, gen)
            else:
                final = MAML_RECIPES[recipe]["meta_lr_final"]
                meta_lr = MAML["meta_lr"] if final is None else cosine(MAML["meta_lr"], final, frac)
                loss = maml_step(params, adam, data, ways, shots, algorithm == "fomaml", gen, recipe, meta_lr)
            durations.append(time.perf_counter() - t0)
            train_seconds += durations[-1]
            log.write(json.dumps({"iteration": it + 1, "seconds": time.perf_counter() - start,
                                  "train_seconds": train_seconds, "loss": loss}) + "\n")
            while next_k <= snapshots and (train_seconds >= next_k * budget_seconds / snapshots
                                           or it == meta_iters - 1):
                log.flush()
                names = list(params)
                state = {"step": adam["step"], "m": dict(zip(names, adam["m"], strict=True)),
                         "v": dict(zip(names, adam["v"], strict=True))}
                target = out_dir / f"snapshot-{next_k}.pt"
                torch.save({"algorithm": algorithm, "recipe": recipe, "ways": ways, "shots": shots,
                            "iteration": it + 1, "train_seconds": train_seconds,
                            "model": {n: p.detach().clone() for n, p in params.items()},
                            adam_key: state, "generator": gen.get_state()}, target.with_suffix(".tmp"))
                target.with_suffix(".tmp").replace(target)  # a crash never leaves half a snapshot
                next_k += 1
    log_lines = (out_dir / "log.jsonl").read_text().splitlines()
    clock = [json.loads(line)["train_seconds"] for line in log_lines]
    steps = [b - a for a, b in zip([0.0, *clock[:-1]], clock, strict=True)]
    summary = {"algorithm": algorithm, "recipe": recipe, "iterations": len(clock), "train_seconds": clock[-1],
               "median_seconds_per_iteration": statistics.median(steps)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# -------------------------------------------------------------------------------------- evaluate
def predict(fast: Params, xs: torch.Tensor, xq: torch.Tensor, transductive: bool, head: str,
            eps: float = BN_EPSILON) -> torch.Tensor:
    """Query predictions [G, M]: all queries in one batch, or each query batched with the support set
    (reptile.py:125-134), as G * M models so that batch-norm statistics stay per batch."""
    with torch.no_grad():
        if transductive:
            return forward(fast, xq.transpose(0, 1), head, eps).argmax(-1).T
        g, m, n = xq.shape[0], xq.shape[1], xs.shape[1]
        batch = torch.cat([xs.unsqueeze(1).expand(g, m, *xs.shape[1:]), xq.unsqueeze(2)], dim=2)
        per_query = {k: p.repeat_interleave(m, dim=0) for k, p in fast.items()}
        logits = forward(per_query, batch.reshape(g * m, n + 1, *xs.shape[2:]).transpose(0, 1), head, eps)
        return logits[-1].argmax(-1).view(g, m)


def reptile_adapt(snapshot: dict, xs: torch.Tensor, ys: torch.Tensor, steps: int, batch_size: int,
                  first_task: int, seed: int) -> Params:
    """Adam from the snapshot's weights and Adam state on each task's support set, G tasks at once
    (each task starts from the same state, as the full-state restore of reptile.py:114, 122)."""
    g, names = xs.shape[0], list(snapshot["model"])
    fast = {n: snapshot["model"][n].unsqueeze(0).repeat(g, *[1] * snapshot["model"][n].dim()).requires_grad_()
            for n in names}
    adam = {"step": snapshot["adam"]["step"],
            "m": [snapshot["adam"]["m"][n].unsqueeze(0).repeat_interleave(g, 0) for n in names],
            "v": [snapshot["adam"]["v"][n].unsqueeze(0).repeat_interleave(g, 0) for n in names]}
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + first_task + i) for i in range(g)]
    orders = [mini_batches(xs.shape[1], batch_size, steps, gen) for gen in gens]
    rows = torch.arange(g).unsqueeze(1)
    plist = list(fast.values())
    for s in range(steps):
        idx = torch.stack([order[s] for order in orders])
        logits = forward(fast, xs[rows, idx].transpose(0, 1), "flatten")
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys[rows, idx].T.reshape(-1),
                               reduction="sum")  # each task's sum (models.py:27-30), tasks independent
        tf_adam_(plist, list(torch.autograd.grad(loss, plist)), adam, REPTILE["lr"], beta1=0.0)
    return {n: p.detach() for n, p in fast.items()}


def evaluate(algorithm: str, snapshot: str, tasks: str, steps: int | None = None,
             inner_batch_size: int | None = None, transductive: bool | None = None, out: str | None = None,
             seed: int = 0, chunk: int = 25, threads: int = 1) -> dict:
    """Adapt on each task's support set with the published test protocol; accuracy on its queries.

    Defaults: Reptile 50 Adam steps on mini-batches of 5, non-transductive; MAML/FOMAML 10 SGD steps
    of lr 0.4 on the full support set, transductive. ``chunk`` tasks are processed together.
    """
    assert algorithm in ALGORITHMS, algorithm
    torch.set_num_threads(threads)
    snap = torch.load(snapshot, weights_only=True)
    assert snap["algorithm"] == algorithm, (snap["algorithm"], algorithm)
    data = torch.load(tasks, weights_only=True)
    reptile = algorithm == "reptile"
    recipe = snap.get("recipe", "cbfinn")
    settings = MAML_RECIPES[recipe]
    head = ("flatten", BN_EPSILON) if reptile else (settings["head"], settings["bn_eps"])
    steps = (50 if reptile else 10) if steps is None else steps
    transductive = (not reptile) if transductive is None else transductive
    n_support = data["support_x"].shape[1]
    ways = snap["model"]["fc.bias"].shape[0]
    batch_size = (5 if reptile else n_support) if inner_batch_size is None else inner_batch_size
    if not reptile and batch_size != n_support:
        raise ValueError("MAML adapts on the full support set (inner_batch_size must be None)")
    per_task: list[float] = []
    for start in range(0, data["support_x"].shape[0], chunk):
        xs, ys = data["support_x"][start:start + chunk], data["support_y"][start:start + chunk]
        xq, yq = data["query_x"][start:start + chunk], data["query_y"][start:start + chunk]
        if reptile:
            fast = reptile_adapt(snap, xs, ys, steps, batch_size, start, seed)
        else:
            params = {n: p.detach() for n, p in snap["model"].items()}
            fast = maml_adapt(params, xs, ys, steps, MAML["inner_lr"], n_support // ways,
                              create_graph=False, track=False, recipe=recipe)
            fast = {n: p.detach() for n, p in fast.items()}
        preds = predict(fast, xs, xq, transductive, *head)
        per_task += (preds == yq).double().mean(1).tolist()
    accuracy = float(np.mean(per_task))
    result = {"accuracy": accuracy, "ci95": float(1.96 * np.std(per_task) / math.sqrt(len(per_task))),
              "per_task": per_task}
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    fire.Fire({"train": train, "evaluate": evaluate})
