"""Coded concepts (DICOM PS3.16) that Radflow writes into the SEG and SR objects it sends.

A task declares how its results are coded (:class:`ResultCoding`); the writers in
:mod:`radflow.dicom.seg` and :mod:`radflow.dicom.sr` use these and nothing hard-coded elsewhere.
Plain data: importing this module loads neither highdicom nor a network.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

ARTIFICIAL_INTELLIGENCE: Code = codes.DCM.ArtificialIntelligence
"""Algorithm Family (CID 7162) of every Radflow model."""
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging")
"""Procedure reported when a task names none: imaging, unspecified."""
DEVICE: Code = codes.DCM.Device
"""Observer Type (CID 270) of a report made by a model."""
PROBABILITY: Code = codes.DCM.Probability
THRESHOLD: Code = codes.DCM.ThresholdValue
PRESENCE: Code = codes.DCM.PresenceOfProperty
PRESENT: Code = codes.SCT.Present
ABSENT: Code = codes.SCT.Absent
AREA: Code = codes.SCT.Area
VOLUME: Code = codes.SCT.Volume
NO_UNITS: Code = codes.UCUM.NoUnits
SQUARE_MILLIMETER: Code = codes.UCUM.SquareMillimeter
CUBIC_MILLIMETER: Code = codes.UCUM.CubicMillimeter
# UCUM annotations (a unit of 1 with a name): for images without a known pixel spacing, such
# as photographs, areas are counted in pixels rather than guessed in millimetres.
PIXELS = Code("{pixels}", "UCUM", "pixels")
VOXELS = Code("{voxels}", "UCUM", "voxels")


@dataclass(frozen=True)
class Segment:
    """One structure a segmentation task outlines, as a DICOM SEG segment describes it.

    ``category`` from CID 7150 (e.g. SCT 91723000 "Anatomical structure"), ``property_type``
    from CID 7151 (e.g. SCT 59820001 "Blood vessel").
    """

    label: str
    category: Code
    property_type: Code

    def __post_init__(self) -> None:
        if not self.label or len(self.label) > 64:
            raise ValueError(f"segment label {self.label!r} must be 1 to 64 characters")


@dataclass(frozen=True)
class ResultCoding:
    """How a task's results are coded in the objects sent to a PACS.

    ``finding``: for a classification task, the concept its positive label stands for (the SR
    reports it with its probability); ``segments``: for a segmentation task, one per output
    channel of its network, in order (segment numbers 1, 2, ...).
    """

    procedure: Code = IMAGING_PROCEDURE
    finding: Code | None = None
    segments: tuple[Segment, ...] = ()
