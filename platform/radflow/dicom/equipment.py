"""Who made a derived DICOM object: Radflow, and the model version as Algorithm Identification."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version as package_version

import highdicom as hd
from pydicom.sr.coding import Code

from radflow.dicom.codes import ARTIFICIAL_INTELLIGENCE

MANUFACTURER = "Radflow"


@dataclass(frozen=True)
class Algorithm:
    """The model behind a result: ``name`` (the task), ``version`` ("v3") and family.

    ``device`` names the model version for the equipment modules ("pneumonia-cxr v3"); it is
    what a PACS shows as the device that made the object.
    """

    name: str
    version: str
    family: Code = ARTIFICIAL_INTELLIGENCE

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ValueError("an algorithm needs a name and a version")

    @classmethod
    def for_model(cls, task: str, version: int) -> Algorithm:
        return cls(task, f"v{version}")

    @property
    def device(self) -> str:
        return f"{self.name} {self.version}"

    def seg_identification(self) -> hd.AlgorithmIdentificationSequence:
        """For a SEG's segment descriptions (Algorithm Identification Macro)."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name, family=self.family, version=self.version
        )

    def sr_identification(self) -> hd.sr.AlgorithmIdentification:
        """For an SR's measurement groups (TID 4019)."""
        return hd.sr.AlgorithmIdentification(
            name=self.name, version=self.version, family=self.family, manufacturer=MANUFACTURER
        )


def software_versions() -> str:
    """Radflow's version, as Software Versions (0018,1020) of what it writes."""
    return f"radflow {package_version('radflow')}"
