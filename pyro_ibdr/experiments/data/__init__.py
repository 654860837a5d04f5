"""Datasets: VTAB-1k image tasks as file lists."""

from pyro_ibdr.experiments.data.vtab import (
    SPLITS,
    TASKS,
    PreloadedDataset,
    VTABDataset,
    VTABTask,
    get_task,
    read_file_list,
    resolve_task_dir,
)

__all__ = [
    "SPLITS",
    "TASKS",
    "PreloadedDataset",
    "VTABDataset",
    "VTABTask",
    "get_task",
    "read_file_list",
    "resolve_task_dir",
]
