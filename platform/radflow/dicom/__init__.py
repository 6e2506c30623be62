"""DICOM reading, validation, pixel decoding and synthetic data."""
