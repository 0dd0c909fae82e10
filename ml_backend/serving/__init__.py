"""The backend Label Studio talks to: the Flask app, the per-process runtime, the model registry
(hot reload) and metrics. A request goes server → model (`ml_backend.model`) →
learner."""
