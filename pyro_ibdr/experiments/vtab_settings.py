"""Per-task settings of the authors' final VTAB-1k configurations, combined with the ``official`` preset."""

from __future__ import annotations

from dataclasses import dataclass

from ..presets import OFFICIAL, Preset


@dataclass(frozen=True)
class VTABTaskSettings:
    """lr (SGD, momentum 0.9), LoRA rank/alpha, ε (the λ-bound ρ of the output-space cost), global clip
    norm before the ascent, K particles, and whether RandAugment + flips were used."""

    lr: float
    rank: int
    alpha: int
    epsilon: float
    clip: float
    particles: int
    augment: bool


OFFICIAL_VTAB: dict[str, VTABTaskSettings] = {
    "cifar100": VTABTaskSettings(0.1, 2, 2, 0.03, 0.2, 4, False),
    "caltech101": VTABTaskSettings(0.5, 4, 16, 0.03, 0.2, 4, False),
    "dtd": VTABTaskSettings(0.2, 4, 16, 0.03, 0.2, 4, False),
    "oxford_flowers102": VTABTaskSettings(0.75, 8, 8, 0.05, 0.2, 4, True),
    "oxford_iiit_pet": VTABTaskSettings(0.15, 8, 8, 0.03, 0.2, 4, True),
    "svhn": VTABTaskSettings(0.5, 8, 8, 0.03, 0.15, 4, True),
    "sun397": VTABTaskSettings(0.2, 8, 8, 0.03, 0.2, 4, True),
    "patch_camelyon": VTABTaskSettings(0.5, 8, 8, 0.03, 0.2, 4, True),
    "eurosat": VTABTaskSettings(0.5, 8, 8, 0.1, 0.2, 4, False),
    "resisc45": VTABTaskSettings(0.5, 8, 8, 0.03, 0.15, 4, True),
    "diabetic_retinopathy": VTABTaskSettings(0.1, 8, 8, 0.03, 0.2, 4, True),
    "clevr_count": VTABTaskSettings(0.25, 8, 8, 0.03, 0.2, 4, True),
    "clevr_dist": VTABTaskSettings(0.25, 8, 8, 0.03, 0.15, 5, False),
    "dmlab": VTABTaskSettings(0.25, 8, 8, 0.03, 0.12, 4, True),
    "kitti": VTABTaskSettings(0.12, 8, 8, 0.03, 0.3, 3, True),
    "dsprites_loc": VTABTaskSettings(0.5, 8, 8, 0.03, 0.15, 4, True),
    "dsprites_ori": VTABTaskSettings(2.0, 8, 8, 0.03, 0.2, 4, False),
    "smallnorb_azi": VTABTaskSettings(0.2, 8, 8, 0.03, 0.2, 4, True),
    "smallnorb_ele": VTABTaskSettings(0.1, 8, 8, 0.1, 0.25, 4, True),
}

def official_vtab_settings(task: str) -> VTABTaskSettings:
    """The authors' settings for a canonical VTAB-1k task name."""
    if task not in OFFICIAL_VTAB:
        raise ValueError(f"no official settings for task {task!r}; known: {sorted(OFFICIAL_VTAB)}")
    return OFFICIAL_VTAB[task]


def official_preset(task: str) -> Preset:
    """:data:`~pyro_ibdr.presets.OFFICIAL` with the task's lr, K, ε (= ρ of the output cost), clip and
    augmentation (the LoRA rank/alpha of the table shape the network, not the preset)."""
    tuned = official_vtab_settings(task)
    return OFFICIAL.replace(lr=tuned.lr, num_particles=tuned.particles, rho=tuned.epsilon, clip_norm=tuned.clip,
                            augment=tuned.augment)
