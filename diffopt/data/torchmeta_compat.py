"""The three fixes torchmeta 1.8.0 needs on current torch / torchvision, in one place.

torchmeta 1.8.0 was written for torch < 1.10. On torch 2.x it breaks in three places we use:

(a) ``torchmeta/datasets/utils.py`` imports ``_get_confirm_token`` and ``_save_response_content``
    from ``torchvision.datasets.utils``; torchvision removed them, so ``import torchmeta`` fails.
    Fix: provide them in ``torchvision.datasets.utils`` before torchmeta is imported.
(b) ``torch.utils.data.Subset.__init__`` refuses a subclass that overrides ``__getitem__`` without
    ``__getitems__``; torchmeta's ``SubsetTask`` does, so the first batch of any ClassSplitter'd
    dataset fails. Fix: give ``SubsetTask`` a ``__getitems__`` that defers to its ``__getitem__``.
(c) ``torchmeta.datasets.utils.download_file_from_google_drive`` calls ``check_integrity`` without
    importing it (NameError once an archive is on disk). Fix: bind torchvision's function there.

``load()`` applies each fix only where upstream is still broken, exactly once, and returns the
imported ``torchmeta`` module. ``diffopt`` calls it on import, so no code path of ours imports
torchmeta unfixed. Nothing else in diffopt patches third-party code.
"""

from __future__ import annotations

from types import ModuleType

INSTALL_HINT = "install it with: pip install --no-deps torchmeta==1.8.0 (see README, 'Installing by hand')"

APPLIED: list[str] = []
"""Names of the fixes ``load()`` found necessary and applied in this process."""

_FIXES_DONE = False


def _get_confirm_token(response) -> str | None:
    """Google Drive's download-confirmation token from a ``requests`` response (or None)."""
    for key, value in response.cookies.items():
        if key.startswith("download_warning"):
            return value
    return None


def _save_response_content(response, destination: str, chunk_size: int = 32768) -> None:
    """Stream a ``requests`` response body into ``destination``."""
    with open(destination, "wb") as handle:
        for chunk in response.iter_content(chunk_size):
            if chunk:
                handle.write(chunk)


def _fix_torchvision_download_helpers() -> bool:
    import torchvision.datasets.utils as tv_utils

    missing = [
        name
        for name in ("_get_confirm_token", "_save_response_content")
        if not hasattr(tv_utils, name)
    ]
    for name in missing:
        setattr(tv_utils, name, globals()[name])
    return bool(missing)


def _fix_subset_task_getitems() -> bool:
    from torch.utils.data import Subset
    from torchmeta.utils.data.task import SubsetTask

    if SubsetTask.__getitems__ is not Subset.__getitems__:
        return False  # torchmeta defines its own (or torch no longer has the check)

    def __getitems__(self, indices):
        return [self[index] for index in indices]

    SubsetTask.__getitems__ = __getitems__
    return True


def _fix_check_integrity_import() -> bool:
    import torchmeta.datasets.utils as tm_utils

    if hasattr(tm_utils, "check_integrity"):
        return False
    from torchvision.datasets.utils import check_integrity

    tm_utils.check_integrity = check_integrity
    return True


def load() -> ModuleType:
    """Import torchmeta with the fixes applied; raise ImportError naming the install step."""
    global _FIXES_DONE
    if not _FIXES_DONE:
        if _fix_torchvision_download_helpers():
            APPLIED.append("torchvision_download_helpers")
        try:
            import torchmeta  # noqa: F401  (needs fix (a) in place first)
        except ModuleNotFoundError as error:
            if error.name != "torchmeta":
                raise
            raise ImportError(f"diffopt needs torchmeta 1.8.0, not installed: {INSTALL_HINT}") from None

        if _fix_subset_task_getitems():
            APPLIED.append("subset_task_getitems")
        if _fix_check_integrity_import():
            APPLIED.append("check_integrity_import")
        _FIXES_DONE = True
    import torchmeta

    return torchmeta
