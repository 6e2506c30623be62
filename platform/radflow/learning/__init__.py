"""Learning: tasks, and what turns labelled studies into scored ones.

- ``tasks``: the task registry (what each task routes, preprocesses, trains and reports);
- ``preprocess`` and ``cache``: stored DICOM to model-ready tensors, cached by content;
- ``training``: labelled studies to a registered version; ``evaluation``: metrics and the
  promotion test; ``registry``: versions, champion, rollback; ``retrain``: when a task is due;
- ``inference``: building a version's network, loading its weights, running it (shared by
  scoring, explanations and bundles); ``scoring``: stable studies to predictions;
  ``explain``: Grad-CAM maps; ``bundle``: MONAI bundle export and import;
- ``labels``: ground truth; ``device``: the one place that chooses CUDA or the CPU.
"""
