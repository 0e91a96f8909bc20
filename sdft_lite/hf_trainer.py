"""`transformers.Trainer`, imported without `datasets` (and with it pandas and pyarrow).

transformers' trainer module imports `datasets` only to recognise a `datasets.Dataset` given as
train or eval dataset. sdft-lite gives it a list of its own encoded examples, and reads data
files without `datasets` (`data` imports it for Hub ids and save_to_disk folders only). The three
packages cost ~93 MiB of resident memory, paid for nothing: measured on the 2-core AMD EPYC, the
benchmark's top-k run peaked at 732 MiB with them and 639 MiB without (README, "Speed and memory").

So the module is imported while `transformers.utils.is_datasets_available` answers False, and
each transformers module that took that answer then gets `_datasets_imported` in its place: a
`datasets.Dataset` made later (by sdft-lite's Hub loading, or by a notebook's own code) is
recognised as usual. Nothing is changed if `datasets` or the trainer module is imported already,
or if transformers has no such function (another version: then the import only costs memory).
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType


def _datasets_imported(module: ModuleType) -> bool:
    """`is_datasets_available` for a transformers module imported without `datasets`: True once
    something else has imported it (only then can a `datasets.Dataset` exist), and then `module`
    gets the name its checks use (`isinstance(x, datasets.Dataset)`)."""
    datasets = sys.modules.get("datasets")
    if datasets is not None:
        module.datasets = datasets
    return datasets is not None


def _import_trainer_without_datasets() -> None:
    if "transformers.trainer" in sys.modules or "datasets" in sys.modules:
        return
    import transformers.utils as hf_utils

    available = getattr(hf_utils, "is_datasets_available", None)
    if available is None:
        return

    def not_yet() -> bool:
        return False

    hf_utils.is_datasets_available = not_yet
    try:
        import transformers.trainer  # noqa: F401
    finally:
        hf_utils.is_datasets_available = available
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers.") and vars(module).get("is_datasets_available") is not_yet:
            module.is_datasets_available = functools.partial(_datasets_imported, module)


_import_trainer_without_datasets()

from transformers import Trainer  # noqa: E402

__all__ = ["Trainer"]
