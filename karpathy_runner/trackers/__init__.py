"""Where a run's metrics go besides metrics.jsonl: TensorBoard (tb/), MLflow, Weights & Biases.

The run writer opens the trackers that `train.loggers` names when a run starts or resumes, hands
them every metrics record, a task's images and text, and the run's end (status, config.yaml and
summary.json). Each tracker is a module here named as in `train.loggers`, whose TRACKER class
opens it (base.open_trackers).
"""
