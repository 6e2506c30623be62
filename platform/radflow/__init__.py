"""Radflow's core library: every capability of the platform, callable without Prefect or Streamlit.

Layers, each importing only those below it (checked by the import contracts in pyproject.toml):

- ``services``: what the dashboard and the CLI read and do (worklist, study view, reviews,
  models, pipeline, status, audit, users and their roles);
- ``ingest`` (receiver, watch folder, importers, indexing, study completion, routing) and
  ``learning`` (tasks, training, inference, scoring, evaluation, registry, bundles, explanations);
- ``dicom`` (reading, validating, writing, de-identifying instances), ``db`` (the schema),
  ``store`` (the object store);
- ``settings``, ``errors``, ``outages`` and ``runtime``, which everything may use.

Nothing here imports ``flows``, ``dashboard`` or ``cli``; Prefect and Streamlit are not imported.
"""
