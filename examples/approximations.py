"""The meta-gradient's approximations beside the exact one, at long horizons.

    python examples/approximations.py run                      # sinusoid and Omniglot, T = 10, 50, 100
    python examples/approximations.py run --datasets sinusoid --horizons 10 --results none
    python examples/approximations.py direction --dataset omniglot --steps 10   # the exact one, checked

For each dataset and horizon T (inner steps), one meta-batch of real tasks and the same initial
meta-parameters (training seed 0, MAML's per-dataset defaults) give, each in a fresh process:
the exact second-order meta-gradient (``--inner_checkpoint auto``), first-order MAML, truncated
backpropagation through the last 1 and 10 steps (``--inner_backprop_steps``) and iMAML (its
per-dataset proximal lambda and CG iterations, MAML's model and inner step otherwise; its inner
loop descends the loss plus the proximal term). Compared with the exact meta-gradient of the
initial weights (the model's meta-parameters, which every method has): cosine similarity and
relative error
||g - g_exact|| / ||g_exact||; with each method's peak resident memory growth during the
meta-gradient and its seconds (its second meta-gradient: the first warms the process up).
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffopt.config import resolve_config
from diffopt.data import Episode, get_dataset
from diffopt.firecli import fire_checked
from diffopt.memory import reset_resident_peak, resident_mb
from diffopt.report import library_versions, machine_description, write_section

METHODS = {
    "exact (checkpointed)": dict(algorithm="maml", inner_checkpoint="auto"),
    "first-order MAML": dict(algorithm="fomaml"),
    "truncated, last 1 step": dict(algorithm="maml", inner_backprop_steps=1),
    "truncated, last 10 steps": dict(algorithm="maml", inner_backprop_steps=10),
    "iMAML": dict(algorithm="imaml", inner_solver="gradient", inner_backtrack=False),
}
IMAML_LAMBDA = {"sinusoid": 1.0}
"""iMAML's proximal weight where this comparison does not take the dataset's protocol: on sinusoid,
lambda 1 with MAML's gradient steps (the protocol's Gauss-Newton steps are not MAML's steps)."""
DATASETS = {
    "sinusoid": dict(dataset="sinusoid", shots=10, meta_batch_size=25),
    "omniglot": dict(dataset="omniglot", shots=1, ways=5, meta_batch_size=4, data_root="data"),
    "omniglot_mean_loss": dict(dataset="omniglot", shots=1, ways=5, meta_batch_size=4, data_root="data",
                               inner_loss_reduction="mean"),
}
"""The datasets' settings here (meta-batch 4 on Omniglot: a long horizon's exact gradient costs
T times a step's for every task). ``omniglot_mean_loss``: the inner step on the mean loss, 5x
smaller than cbfinn/maml's on the loss summed over the classes (the goal recipe's first lever)."""


SHARED = ("model", "hidden", "activation", "norm", "norm_eps", "head", "init", "pool", "padding",
          "pool_padding", "input_norm", "inner_lr", "inner_loss_reduction", "inner_params", "test_shots")
"""MAML's per-dataset settings every method takes (iMAML's own defaults differ in model and step
size on Omniglot): only what the method changes differs."""


def _setting(dataset: str, method: str, steps: int, data_root: str | None):
    """(the algorithm, one meta-batch of training tasks) of ``method`` at ``steps`` inner steps."""
    from diffopt.train import build

    options = dict(DATASETS[dataset], inner_steps=steps, progress=False, vectorize="never")
    if data_root is not None and "data_root" in options:
        options["data_root"] = data_root
    maml = resolve_config(**options).to_dict()  # the model and inner loop every method shares
    options.update({key: maml[key] for key in SHARED})
    options.update(METHODS[method])
    if method == "iMAML":
        options["inner_proximal"] = IMAML_LAMBDA.get(dataset)  # None: the dataset's protocol
    if options.get("inner_backprop_steps", 0) > steps:
        options["inner_backprop_steps"] = steps
    config = resolve_config(**options)
    loader = get_dataset(config.dataset).loader(
        "train", seed=config.seed, shots=config.shots, test_shots=config.test_shots, ways=config.ways,
        batch_size=config.meta_batch_size, num_tasks=config.meta_batch_size, **config.data_options())
    return build(config), Episode.from_torchmeta(next(iter(loader)))


def gradient(dataset: str, method: str, steps: int, out: str, data_root: str | None = None) -> None:
    """(In a fresh process) one meta-gradient; its model gradient saved to ``out``, and the JSON of
    its memory and seconds printed."""
    torch.set_num_threads(1)
    algorithm, episode = _setting(dataset, method, steps, data_root)
    algorithm.meta_gradient(episode)  # a first, cold call: lazy initialisation, caches
    algorithm.zero_grad(set_to_none=True)
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # what the first call freed, back to the system (glibc)
    reset_resident_peak()
    before = resident_mb()["VmRSS"]
    start = time.perf_counter()
    algorithm.meta_gradient(episode)
    seconds = time.perf_counter() - start
    growth = resident_mb()["VmHWM"] - before
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in algorithm.model.parameters()])
    torch.save(flat, out)
    print(json.dumps({"peak_growth_mb": growth, "seconds": seconds}))


def direction(dataset: str = "omniglot", steps: int = 10, eps=(1e-6, 1e-7, 1e-8, 1e-9),
              data_root: str | None = None) -> None:
    """Check the exact meta-gradient g of ``gradient``'s setting in float64 along its own direction:
    central differences of the meta-loss at theta +- eps g/|g| against |g|."""
    torch.set_num_threads(1)
    algorithm, episode = _setting(dataset, "exact (checkpointed)", steps, data_root)
    algorithm, episode = algorithm.double(), episode.to(dtype=torch.float64)
    algorithm.meta_gradient(episode)
    params = [p for p in algorithm.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    unit = [p.grad / norm for p in params]
    for step in (eps,) if isinstance(eps, float) else eps:
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, u in zip(params, unit, strict=True):
                    p.add_(sign * step * u)
            values.append(algorithm.meta_loss(episode, track_higher_grads=False).item())
            with torch.no_grad():
                for p, u in zip(params, unit, strict=True):
                    p.sub_(sign * step * u)
        slope = (values[0] - values[1]) / (2 * step)
        print(f"{dataset} T={steps} eps={step:g}: central difference {slope:.10g}, |g| {norm.item():.10g}, "
              f"relative difference {abs(slope - norm.item()) / norm.item():.1e}")


def run(datasets=tuple(DATASETS), horizons=(10, 50, 100), data_root: str = "data",
        results: str = "RESULTS.md") -> None:
    """Every method at every horizon on every dataset; a table per dataset into ``results``."""
    datasets = (datasets,) if isinstance(datasets, str) else tuple(datasets)
    horizons = (horizons,) if isinstance(horizons, int) else tuple(horizons)
    lines = []
    with tempfile.TemporaryDirectory() as folder:
        for dataset in datasets:
            settings = ", ".join(f"{k} {v}" for k, v in DATASETS[dataset].items() if k != "data_root")
            lines += [f"{dataset} ({settings}):", "",
                      "| T | method | cosine to exact | relative error | norm / exact norm | peak memory "
                      "growth (MB) | seconds |", "|---|---|---|---|---|---|---|"]
            for steps in horizons:
                exact = None
                for method in METHODS:
                    out = str(Path(folder) / f"{dataset}-{steps}-{len(lines)}.pt")
                    done = subprocess.run(
                        [sys.executable, __file__, "gradient", dataset, method, str(steps), out,
                         f"--data_root={data_root}"], capture_output=True, text=True)
                    if done.returncode != 0:
                        lines.append(f"| {steps} | {method} | failed: "
                                     f"{(done.stderr.strip().splitlines() or ['?'])[-1][:100]} | | | | |")
                        print(lines[-1], flush=True)
                        continue
                    measured = json.loads(done.stdout.strip().splitlines()[-1])
                    grad = torch.load(out, weights_only=True)
                    exact = grad if exact is None else exact
                    cosine = torch.nn.functional.cosine_similarity(grad, exact, dim=0).item()
                    error = ((grad - exact).norm() / exact.norm()).item()
                    scale = (grad.norm() / exact.norm()).item()
                    lines.append(f"| {steps} | {method} | {cosine:.3f} | {error:.3f} | {scale:.3g} | "
                                 f"{measured['peak_growth_mb']:.0f} | {measured['seconds']:.2f} |")
                    print(lines[-1], flush=True)
            lines.append("")
    body = "\n".join([
        f"Command: `python examples/approximations.py run`. One meta-batch of real training tasks "
        "(seed 0), the initial meta-parameters of training seed 0, MAML's per-dataset defaults "
        "otherwise; each method in a fresh process on one torch thread, timed on its second "
        "meta-gradient; memory: the growth of the peak resident set during it. Compared on the "
        "model's weights (every method's meta-parameters). "
        f"Machine: {machine_description()}; {library_versions()}; "
        f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "", *lines])
    print(body)
    if results != "none":
        extra = [name for name in datasets if name not in ("sinusoid", "omniglot")]
        key = "-".join(["approximations", *extra])
        write_section(results, key, "The meta-gradient's approximations at long horizons", body)


if __name__ == "__main__":
    fire_checked({"run": run, "gradient": gradient, "direction": direction}, name="approximations")
