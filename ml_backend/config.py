"""Settings from the environment, read once per process.

Every variable is documented in the README's Configuration table.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sdk.label_config import DEFAULT_BACKGROUND_LABEL, BrushTarget, parse_brush_target

# Network tiles, the one place for their defaults (`TILE_SIZE`, `TILE_OVERLAP`): every prediction,
# evaluation, pool scoring and whole-volume segmentation starts from these.
TILE = 1024  # tile edge: one pass covers a 1024² image
TILE_OVERLAP = 64  # overlap of neighbouring tiles, blended

T = TypeVar("T")


def _parsed(name: str, default: T, parse: Callable[[str], T], what: str) -> T:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be {what}, got {raw!r}") from None


def _int(name: str, default: int) -> int:
    return _parsed(name, default, int, "an integer")


def _float(name: str, default: float) -> float:
    return _parsed(name, default, float, "a number")


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name} must be true or false (1/0, yes/no, on/off), got {raw!r}")


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = os.environ.get(name, "").strip().lower() or default
    if raw not in choices:
        raise ValueError(f"environment variable {name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _roots() -> tuple[Path, ...]:
    """LOCAL_FILES_ROOTS (os.pathsep-separated) plus Label Studio's local-files document root."""
    raw = os.environ.get("LOCAL_FILES_ROOTS", "").split(os.pathsep)
    raw += [os.environ.get(f"{p}LOCAL_FILES_DOCUMENT_ROOT", "") for p in ("LABEL_STUDIO_", "")]
    return tuple(dict.fromkeys(Path(os.path.abspath(r.strip())) for r in raw if r.strip()))


def _names(name: str) -> tuple[str, ...]:
    """A comma-separated list, blanks dropped."""
    return tuple(part.strip() for part in os.environ.get(name, "").split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 9090
    model_dir: Path = Path("models")
    label_studio_url: str = "http://localhost:8080"
    label_studio_api_key: str = ""
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    checkpoint_store: str = "disk"  # or "redis": versions travel through REDIS_URL (no shared MODEL_DIR)
    tile_size: int = TILE
    tile_overlap: int = TILE_OVERLAP
    max_image_bytes: int = 256 * 2**20
    max_image_pixels: int = 16384 * 16384
    max_predict_bytes: int = 2048 * 2**20
    image_cache_mb: int = 512
    image_timeout: float = 30.0
    local_files_roots: tuple[Path, ...] = ()
    image_hosts: tuple[str, ...] = ()
    max_request_bytes: int = 32 * 2**20
    predict_queue: int = 8
    predict_budget: float = 60.0
    preannotate_chunk: int = 50
    max_labels: int = 32
    background_label: str = DEFAULT_BACKGROUND_LABEL  # a <Label> of this name: scribble mode ("" = never)
    max_projects: int = 64
    threads: int = 4
    queue_name: str = "emloop"
    train_debounce: float = 10.0
    train_lock_ttl: int = 30
    train_job_timeout: int = 6 * 3600
    train_steps: int = 1000
    train_patch_size: int = 128
    train_batch_size: int = 16
    train_holdout: float = 0.15
    click_train_steps: int = 200  # fine-tuning of the click network per training run (0 = never)
    queue_strategy: str = "entropy"
    queue_clusters: bool = True

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            host=os.environ.get("HOST", cls.host),
            port=_int("PORT", cls.port),
            model_dir=Path(os.environ.get("MODEL_DIR", str(cls.model_dir))),
            label_studio_url=os.environ.get("LABEL_STUDIO_URL", cls.label_studio_url).rstrip("/"),
            label_studio_api_key=os.environ.get("LABEL_STUDIO_API_KEY", ""),
            basic_auth_user=os.environ.get("BASIC_AUTH_USER", ""),
            basic_auth_pass=os.environ.get("BASIC_AUTH_PASS", ""),
            redis_url=os.environ.get("REDIS_URL", cls.redis_url),
            checkpoint_store=_choice("CHECKPOINT_STORE", cls.checkpoint_store, ("disk", "redis")),
            tile_size=_int("TILE_SIZE", cls.tile_size),
            tile_overlap=_int("TILE_OVERLAP", cls.tile_overlap),
            max_image_bytes=_int("MAX_IMAGE_MB", cls.max_image_bytes // 2**20) * 2**20,
            max_image_pixels=_int("MAX_IMAGE_PIXELS", cls.max_image_pixels),
            max_predict_bytes=_int("MAX_PREDICT_MB", cls.max_predict_bytes // 2**20) * 2**20,
            image_cache_mb=_int("IMAGE_CACHE_MB", cls.image_cache_mb),
            image_timeout=_float("IMAGE_TIMEOUT", cls.image_timeout),
            local_files_roots=_roots(),
            image_hosts=_names("IMAGE_HOSTS"),
            max_request_bytes=_int("MAX_REQUEST_MB", cls.max_request_bytes // 2**20) * 2**20,
            predict_queue=max(1, _int("PREDICT_QUEUE", cls.predict_queue)),
            predict_budget=_float("PREDICT_BUDGET_SECONDS", cls.predict_budget),
            preannotate_chunk=max(1, _int("PREANNOTATE_CHUNK", cls.preannotate_chunk)),
            max_labels=_int("MAX_LABELS", cls.max_labels),
            background_label=os.environ.get("BACKGROUND_LABEL", cls.background_label).strip(),
            max_projects=max(1, _int("MAX_PROJECTS", cls.max_projects)),
            threads=_int("THREADS", cls.threads),
            queue_name=os.environ.get("RQ_QUEUE", cls.queue_name),
            train_debounce=_float("TRAIN_DEBOUNCE_SECONDS", cls.train_debounce),
            train_lock_ttl=_int("TRAIN_LOCK_TTL", cls.train_lock_ttl),
            train_job_timeout=_int("TRAIN_JOB_TIMEOUT", cls.train_job_timeout),
            train_steps=_int("TRAIN_STEPS", cls.train_steps),
            train_patch_size=_int("TRAIN_PATCH_SIZE", cls.train_patch_size),
            train_batch_size=_int("TRAIN_BATCH_SIZE", cls.train_batch_size),
            train_holdout=_float("TRAIN_HOLDOUT_FRACTION", cls.train_holdout),
            click_train_steps=max(0, _int("CLICK_TRAIN_STEPS", cls.click_train_steps)),
            queue_strategy=os.environ.get("QUEUE_STRATEGY", cls.queue_strategy).strip() or cls.queue_strategy,
            queue_clusters=_bool("QUEUE_CLUSTERS", cls.queue_clusters),
        )

    def brush_target(self, label_config: str | None) -> BrushTarget:
        """What a project's label config asks to segment, under these limits (`MAX_LABELS`) and
        background label (`BACKGROUND_LABEL`): the one way every part reads it, so they agree."""
        return parse_brush_target(label_config, self.max_labels, self.background_label)
