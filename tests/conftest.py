"""Shared helpers: Hypothesis profiles, small random episodes and algorithms."""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings

from diffopt.algorithms import build_algorithm
from diffopt.data import Episode
from diffopt.data.episode import Task
from diffopt.data.prepare import prepare_omniglot
from diffopt.inner import InnerLoop
from diffopt.models import MLP

# CI checks the same examples every run (no flaky reds); `pytest --hypothesis-profile explore`
# searches new random ones, ten times as many.
settings.register_profile("ci", derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=1000,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


def _torch_globals() -> dict:
    """torch's process-wide settings a test may change (the random generators aside: tests seed
    what they draw)."""
    return {"threads": torch.get_num_threads(), "dtype": torch.get_default_dtype(),
            "grad": torch.is_grad_enabled(), "anomaly": (torch.is_anomaly_enabled(),
                                                         torch.is_anomaly_check_nan_enabled()),
            "deterministic": (torch.are_deterministic_algorithms_enabled(),
                              torch.is_deterministic_algorithms_warn_only_enabled()),
            "matmul_precision": torch.get_float32_matmul_precision()}


@pytest.fixture(autouse=True)
def restore_global_state():
    """Every test starts from the settings the session started with: torch's thread count,
    default dtype, grad mode, anomaly and determinism modes, the environment and the working
    directory are put back after it (a test that sets one thread would otherwise run every later
    test on one thread, and a thread-count check would compare 1 with 1)."""
    before, environ, cwd = _torch_globals(), dict(os.environ), os.getcwd()
    yield
    after = _torch_globals()
    if after["threads"] != before["threads"]:
        torch.set_num_threads(before["threads"])
    if after["dtype"] != before["dtype"]:
        torch.set_default_dtype(before["dtype"])
    torch.set_grad_enabled(before["grad"])
    if after["anomaly"] != before["anomaly"]:
        torch.autograd.set_detect_anomaly(*before["anomaly"])
    if after["deterministic"] != before["deterministic"]:
        torch.use_deterministic_algorithms(before["deterministic"][0], warn_only=before["deterministic"][1])
    if after["matmul_precision"] != before["matmul_precision"]:
        torch.set_float32_matmul_precision(before["matmul_precision"])
    if dict(os.environ) != environ:
        os.environ.clear()
        os.environ.update(environ)
    if os.getcwd() != cwd:
        os.chdir(cwd)


class _StepClockTime:
    """``time`` for diffopt.train with a fake ``perf_counter`` (the rest is the real module)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def step_clock(monkeypatch):
    """``step_clock(seconds)``: from then on, in this test, each meta-step of ``diffopt.train``
    takes exactly ``seconds`` of its training clock and nothing else takes any time, so what
    --max_seconds, --validate_every_seconds and --snapshot_every_seconds do is deterministic."""
    import diffopt.train as train_module

    def install(seconds: float) -> None:
        clock, real = _StepClockTime(), train_module.meta_step

        def meta_step(*args, **kwargs):
            clock.now += seconds
            return real(*args, **kwargs)

        monkeypatch.setattr(train_module, "time", clock)
        monkeypatch.setattr(train_module, "meta_step", meta_step)

    return install


@pytest.fixture
def compare_in_process(monkeypatch):
    """diffopt compare's runs in this process (``run_one``, what each child process runs)
    instead of children of a run server, which costs the server's imports (seconds on a loaded
    machine): for tests of what compare does with its runs. The child processes themselves are
    tested by test_compare_server, test_compare's module grid and resumption and test_plugins."""
    import diffopt.compare.runs as compare_module
    from diffopt.compare.results import write_report
    from diffopt.runfolder import RunFolder

    def run_here(config, protocol, log, progress, server):
        log.parent.mkdir(parents=True, exist_ok=True)
        compare_module.run_one(config, protocol)
        return RunFolder(config.run_dir).comparison_record()

    monkeypatch.setattr(compare_module, "_run_in_subprocess", run_here)
    monkeypatch.setattr(compare_module, "_report", lambda out, runs, server: write_report(out))


def first_task(seed: int = 0) -> Task:
    """The one task of ``random_episode(seed, tasks=1)``."""
    return next(iter(random_episode(seed, tasks=1)))


def random_episode(seed: int, tasks: int = 2, shots: int = 5, queries: int = 7,
                   dtype: torch.dtype = torch.float64) -> Episode:
    """A meta-batch of random 1-d regression tasks: x ~ N(0, 1), y ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return Episode(rand(tasks, shots, 1), rand(tasks, shots, 1), rand(tasks, queries, 1),
                   rand(tasks, queries, 1))


def small_algorithm(name: str = "maml", optimizer: str = "sgd", lr: float = 0.1, steps: int = 1,
                    hidden=(8, 8), activation: str = "tanh", seed: int = 0,
                    dtype: torch.dtype = torch.float64, vectorize: str = "never", options=None):
    """An algorithm on a small MLP; the loop over tasks (higher) unless ``vectorize`` says;
    ``options``: the inner optimizer's hyper-parameters."""
    torch.manual_seed(seed)
    model = MLP(1, 1, hidden, activation).to(dtype)
    inner = InnerLoop(optimizer, lr, steps, model=model, options=options)
    return build_algorithm(name, model, inner, F.mse_loss, vectorize)


def torchmeta_batches(name: str, *, split: str, ways: int, shots: int, test_shots: int, batch_size: int,
                      num_tasks: int, seed: int, root: str, start: int = 0, rotations: bool = True,
                      images: str = "bilinear", class_split: str = "vinyals") -> list[dict]:
    """The batches torchmeta alone gives for diffopt's task stream of these loader arguments:
    task i's classes from ``TaskSampler``, then torchmeta's helper dataset seeded by (seed, i)
    (dataset.py:200-203, ``torch.manual_seed`` for ``Categorical``), its own ``ClassSplitter``,
    ``ToTensor`` transforms and ``BatchMetaDataLoader`` collate: none of diffopt's loader."""
    from torchvision.transforms import Compose, InterpolationMode, Lambda, Resize, ToTensor

    from diffopt.data.images import TORCHMETA_SPLITS, TaskSampler, reptile_class_split, task_seed

    options = {} if rotations else {"class_augmentations": None}
    # torchmeta once diffopt.data.images has applied its fixes (torchmeta_compat)
    from torchmeta.datasets import helpers
    from torchmeta.utils.data import BatchMetaDataLoader

    if images != "bilinear":
        steps = [Resize(28, interpolation=InterpolationMode.NEAREST), ToTensor()]
        invert = [Lambda(lambda x: 1 - x)] if images == "nearest_strokes_0" else []
        options["transform"] = Compose(steps + invert)
    dataset = getattr(helpers, name)(root, ways=ways, shots=shots, test_shots=test_shots,
                                     **{TORCHMETA_SPLITS[split]: True}, download=False, **options)
    if class_split == "reptile":
        labels = reptile_class_split(root, split)
        dataset.dataset._labels, dataset.dataset._num_classes = labels, len(labels)

    class Read(torch.utils.data.Dataset):
        def __init__(self, examples):
            self.examples = examples

        def __getitem__(self, index):
            return self.examples[index]

        def __len__(self):
            return len(self.examples)

    class Seeded(torch.utils.data.Dataset):
        def __getitem__(self, key):
            index, classes = key
            dataset.seed(task_seed(seed, index))
            torch.manual_seed(task_seed(seed, index))
            task = dataset[classes]  # read now: Categorical draws its labels at the first read
            return OrderedDict((name, Read([examples[i] for i in range(len(examples))]))
                               for name, examples in task.items())

    sampler = TaskSampler(len(dataset.dataset), ways, num_tasks, seed, start)
    with torch.random.fork_rng(devices=[]):
        return list(BatchMetaDataLoader(Seeded(), batch_size=batch_size, sampler=sampler, shuffle=False))


def assert_same_batches(ours: list[dict], theirs: list[dict]) -> None:
    """Every tensor of every batch equal, bit for bit, dtypes included."""
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        assert list(a) == list(b)
        for split in a:
            for x, y in zip(a[split], b[split], strict=True):
                assert x.dtype == y.dtype and torch.equal(x, y)


SHARED_OMNIGLOT = Path(os.environ.get(  # the shared real data, beside the project (README)
    "DIFFOPT_OMNIGLOT_SOURCE", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"))
CACHE = Path(os.environ.get("DIFFOPT_TEST_CACHE", Path.home() / ".cache" / "diffopt-tests"))


OMNIGLOT_ZIPS = ("images_background.zip", "images_evaluation.zip")


def omniglot_key(source: Path) -> str:
    """The cache key of the shared zips: sha256 of their contents (the two 15 MB zips hash in
    about 0.1 s), so a replaced copy of the same size is prepared again."""
    digest = hashlib.sha256()
    for name in OMNIGLOT_ZIPS:
        with open(source / name, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The shared zips prepared once into a cache outside the source tree (keyed by their
    content). Missing shared data fails the tests that need it: a skip would turn them green."""
    missing = [name for name in OMNIGLOT_ZIPS if not (SHARED_OMNIGLOT / name).is_file()]
    if missing:
        pytest.fail(f"the shared Omniglot zips are not at {SHARED_OMNIGLOT} (missing {', '.join(missing)}); "
                    "set DIFFOPT_OMNIGLOT_SOURCE to the folder that holds them", pytrace=False)
    root = CACHE / f"omniglot-{omniglot_key(SHARED_OMNIGLOT)}"
    prepare_omniglot(SHARED_OMNIGLOT, root)
    return root


def pytest_terminal_summary(terminalreporter, config):
    """pytest-random-order's seed at the end of a shuffled run, under -q too (its header line,
    the only other place it is printed, is hidden there): rerun an order with the flags shown."""
    try:
        from random_order.config import Config
    except ImportError:  # the plugin is in the test extras; without it nothing is shuffled
        return
    order = Config(config)
    if order.is_enabled:
        terminalreporter.write_line(f"test order: --random-order-bucket={order.bucket_type} "
                                    f"--random-order-seed={order.seed}")
