"""Results out: DICOM SR (and SEG) of scored studies, sent to the destinations routing names.

``reports`` writes an SR for every new prediction and queues it (with its SEG) in the
``outbox``; the outbox sends what is due by C-STORE (``scu``) or DICOMweb STOW-RS
(``stow``), retries outages with a backoff and parks what keeps failing, for a person to
re-send.
"""
