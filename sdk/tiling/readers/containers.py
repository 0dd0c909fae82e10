"""Pick the one 3-D dataset inside a container (HDF5 file, Zarr group)."""

from __future__ import annotations

from collections.abc import Mapping


def describe(datasets: Mapping[str, tuple[int, ...]]) -> str:
    """``name (shape)`` list for error messages."""
    if not datasets:
        return "none"
    return ", ".join(f"{name} {tuple(shape)}" for name, shape in sorted(datasets.items()))


def choose_3d(datasets: Mapping[str, tuple[int, ...]], container: str) -> str:
    """Name of the only 3-D dataset; anything else is ambiguous and must be keyed."""
    found = [name for name, shape in datasets.items() if len(shape) == 3]
    if len(found) == 1:
        return found[0]
    what = "no 3-D dataset" if not found else f"{len(found)} 3-D datasets"
    raise ValueError(
        f"{container} holds {what}; name one as '{container}:/<key>'. Datasets: {describe(datasets)}"
    )


def missing_key(key: str, datasets: Mapping[str, tuple[int, ...]], container: str) -> ValueError:
    return ValueError(f"no dataset {key!r} in {container}. Datasets: {describe(datasets)}")


def require_3d(shape: tuple[int, ...], what: str) -> None:
    if len(shape) != 3:
        hint = " (a single 2-D image, not a volume)" if len(shape) == 2 else ""
        raise ValueError(
            f"{what} is {len(shape)}-D with shape {tuple(shape)}{hint}; expected a 3-D (Z, Y, X) volume"
        )
