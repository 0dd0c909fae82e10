"""The click network's versions: the weights shipped in the package, then a project's fine-tuned ones.

Click networks live apart from the segmentation models (`MODEL_DIR/clicks/project-<id>/`), in
one lineage per project whatever the label config: the network finds one object, the
annotator's label names it. They are neither listed to Label Studio nor picked for whole
volumes. Version 0 is the shipped default, trained on the synthetic generator only by
`emloop-train-clicks` and stored in 8 bits (`checkpoint_bytes(compact=True)`).
"""

from __future__ import annotations

from pathlib import Path

from ml_backend.config import Settings
from ml_backend.learner.checkpoint_mirror import RedisMirror, mirror_for
from ml_backend.learner.checkpoints import CheckpointStore, load_checkpoint
from ml_backend.learner.clicks import CLICK_NETWORK
from ml_backend.learner.network import UNet
from sdk.label_config import BrushTarget

DEFAULT_CLICK_WEIGHTS = Path(__file__).resolve().parent / "weights" / "clicks-synthetic.pt"
CLICK_TARGET = BrushTarget("clicks", "image", "image", ("object",))  # one object, whatever its label


def shipped_click_network() -> UNet:
    """The default click network in the package (raises CheckpointError if the file is damaged)."""
    return load_checkpoint(DEFAULT_CLICK_WEIGHTS)[0]


class ClickCheckpointStore(CheckpointStore):
    """A project's click networks; version 0 is `shipped_click_network`."""

    def __init__(self, root: Path, mirror: RedisMirror | None = None) -> None:
        super().__init__(root, CLICK_TARGET, CLICK_NETWORK, mirror)

    @classmethod
    def for_settings(cls, settings: Settings, project: str) -> ClickCheckpointStore:  # type: ignore[override]
        mirror = mirror_for(settings.checkpoint_store, settings.redis_url, settings.queue_name)
        return cls(Path(settings.model_dir) / "clicks" / f"project-{project}", mirror)

    def version_name(self, number: int) -> str:
        return f"emloop-clicks-v{number}"

    def initial_network(self) -> UNet:
        return shipped_click_network()
