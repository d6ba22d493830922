"""Each torchmeta fix works, is needed on this torch (fails without it), and is a no-op once applied."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import pytest
import torch

from diffopt.data import torchmeta_compat as compat
from diffopt.data.sinusoid import sinusoid_loader

compat.load()  # what a loader does first (importing diffopt does not import torchmeta)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


# Loads the compat module from its file without importing the diffopt package (which would
# apply every fix), then applies fix (a) alone so that torchmeta can be imported at all.
ONLY_FIX_A = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("compat", {compat.__file__!r})
c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)
assert c._fix_torchvision_download_helpers()
"""


def run_with_only_fix_a(code: str) -> subprocess.CompletedProcess:
    return run_python(ONLY_FIX_A + textwrap.dedent(code))


def test_all_three_fixes_were_needed_here():
    # On torch 2.14 / torchvision 0.29 upstream is broken in all three places.
    assert compat.APPLIED == [
        "torchvision_download_helpers", "subset_task_getitems", "check_integrity_import"
    ]


def test_fixes_are_noops_once_upstream_is_right():
    # After load() every place is fixed, so applying again changes nothing.
    assert compat._fix_torchvision_download_helpers() is False
    assert compat._fix_subset_task_getitems() is False
    assert compat._fix_check_integrity_import() is False


@pytest.mark.slow
def test_a_import_torchmeta_fails_without_fix():
    result = run_python("import torchmeta")
    assert result.returncode != 0
    assert "_get_confirm_token" in result.stderr


def test_a_download_helpers_behave_like_torchvisions():
    import torchvision.datasets.utils as tv_utils

    class Response:
        cookies = {"other": "x", "download_warning_123": "TOKEN"}

        def iter_content(self, chunk_size):
            yield b"abc"
            yield b""
            yield b"def"

    assert tv_utils._get_confirm_token(Response()) == "TOKEN"
    Response.cookies = {"other": "x"}
    assert tv_utils._get_confirm_token(Response()) is None


def test_a_save_response_content(tmp_path):
    import torchvision.datasets.utils as tv_utils

    class Response:
        def iter_content(self, chunk_size):
            yield from (b"abc", b"", b"def")

    tv_utils._save_response_content(Response(), str(tmp_path / "f"))
    assert (tmp_path / "f").read_bytes() == b"abcdef"


def test_b_first_batch_of_class_splitter_dataset_works():
    loader = sinusoid_loader(seed=0, shots=3, test_shots=4, batch_size=2, num_tasks=2,
                             batched=False)  # torchmeta's BatchMetaDataLoader
    batch = next(iter(loader))
    assert batch["train"][0].shape == (2, 3, 1) and batch["test"][1].shape == (2, 4, 1)
    x, y = batch["train"][0][0], batch["train"][1][0]
    # support targets are a sinusoid of the inputs: amplitude in [0.1, 5]
    assert torch.all(y.abs() <= 5.0) and torch.all(x.abs() <= 5.0)


@pytest.mark.slow
def test_b_first_batch_fails_without_fix():
    result = run_with_only_fix_a("""
        from torchmeta.toy.helpers import sinusoid
        from torchmeta.utils.data import BatchMetaDataLoader
        next(iter(BatchMetaDataLoader(sinusoid(shots=2, test_shots=2, num_tasks=2), batch_size=2)))
    """)
    assert result.returncode != 0
    assert "NotImplementedError" in result.stderr and "__getitems__" in result.stderr


def test_c_google_drive_helper_finds_verified_file(tmp_path, capsys):
    import torchmeta.datasets.utils as tm_utils

    (tmp_path / "archive.tar").write_bytes(b"payload")
    md5 = hashlib.md5(b"payload").hexdigest()
    # A present, verified file is used without any network access.
    tm_utils.download_file_from_google_drive("some-id", str(tmp_path), "archive.tar", md5)
    assert "Using downloaded and verified file" in capsys.readouterr().out


@pytest.mark.slow
def test_c_fails_without_fix(tmp_path):
    (tmp_path / "archive.tar").write_bytes(b"payload")
    result = run_with_only_fix_a(f"""
        import torchmeta.datasets.utils as u
        u.download_file_from_google_drive("id", {str(tmp_path)!r}, "archive.tar", None)
    """)
    assert result.returncode != 0
    assert "NameError" in result.stderr and "check_integrity" in result.stderr


@pytest.mark.slow
def test_import_diffopt_without_torchmeta_names_the_install_step():
    result = run_python("""
        import sys, importlib.abc
        class NotInstalled(importlib.abc.MetaPathFinder):  # as if torchmeta were not installed
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "torchmeta":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, NotInstalled())
        import diffopt  # imports nothing of torchmeta
        diffopt.get_dataset("sinusoid").loader("train", seed=0, shots=1, test_shots=1, batch_size=1,
                                               num_tasks=1)
    """)
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "pip install --no-deps torchmeta==1.8.0" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("module", ["diffopt", "diffopt.cli", "diffopt.train"])
def test_entry_points_leave_torchmeta_to_the_loaders_that_need_it(module):
    result = run_python(f"""
        import sys, {module}
        print(sorted(m for m in ("torchmeta", "torchvision", "matplotlib") if m in sys.modules))
        from diffopt import get_dataset
        next(iter(get_dataset("sinusoid").loader("train", seed=0, shots=1, test_shots=1, batch_size=1,
                                                 num_tasks=1)))
        from diffopt.data import torchmeta_compat as c
        import torchmeta
        print(c.APPLIED)
    """)
    assert result.returncode == 0, result.stderr
    imported, applied = result.stdout.strip().splitlines()
    assert imported == "[]"
    assert "subset_task_getitems" in applied
