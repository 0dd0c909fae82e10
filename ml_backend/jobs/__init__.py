"""Plain RQ functions, enqueued by dotted name and run by `python -m ml_backend.worker`: training
(`train_job`, its Redis state in `training_queue`), ranking a project's queue, pre-annotation and
whole-volume segmentation blocks; `status` says what RQ does not say directly about a job."""
