"""What each strategy needs and accepts, asked by every caller (the backend, prioritize, the
simulation, cold start) instead of lists of names of their own.

One contract, like baal's heuristics: a strategy ranks a pool from some of these inputs —
per-image uncertainty scores (from ``probs``, Monte-Carlo samples, or precomputed), pool
``embeddings`` and the labelled set's embeddings — and the pool pass computes only those.
"""

from __future__ import annotations

from dataclasses import dataclass

from .uncertainty import REDUCTIONS, SCORE_STRATEGIES, check_uncertainty

__all__ = [
    "COLD_START_STRATEGIES",
    "REDUCTIONS",
    "SCORE_STRATEGIES",
    "STRATEGIES",
    "Strategy",
    "get_strategy",
]

_REDUCTION = frozenset({"reduction", "region_size", "region_quantile"})


@dataclass(frozen=True)
class Strategy:
    name: str
    ranks_by_uncertainty: bool = False  # needs per-image scores: probs, MC samples or precomputed
    own_uncertainty: bool = False  # the uncertainty is the strategy itself; otherwise option `uncertainty`
    needs_embeddings: bool = False
    uses_labeled_embeddings: bool = False  # diversity from what is labelled already
    cold_start: bool = False  # meaningful before the first training round (no trained head needed)
    options: frozenset[str] = frozenset()

    def uncertainty(self, option: str = "entropy") -> str | None:
        """The pixel-wise uncertainty it ranks by (`option` for ceal and hybrid); None when it
        uses no predictions."""
        if not self.ranks_by_uncertainty:
            return None
        return self.name if self.own_uncertainty else check_uncertainty(option)

    @property
    def needs_model_outputs(self) -> bool:
        """Whether it ranks by anything the network computes (all but random)."""
        return self.ranks_by_uncertainty or self.needs_embeddings


_REGISTRY: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("random", cold_start=True, options=frozenset({"n"})),
        *(Strategy(name, True, True, options=_REDUCTION) for name in SCORE_STRATEGIES),
        Strategy("kmeans", needs_embeddings=True, cold_start=True, options=frozenset({"n_init"})),
        Strategy("coreset", needs_embeddings=True, uses_labeled_embeddings=True, cold_start=True),
        Strategy("ceal", True, options=_REDUCTION | {"uncertainty"}),
        Strategy(
            "hybrid",
            True,
            needs_embeddings=True,
            uses_labeled_embeddings=True,
            options=_REDUCTION | {"uncertainty", "beta"},
        ),  # fmt: skip
    )
}
STRATEGIES = tuple(_REGISTRY)
COLD_START_STRATEGIES = ("kmeans", "coreset", "random")  # best first


def get_strategy(name: str) -> Strategy:
    """The strategy called `name`, or a ValueError naming the valid ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown strategy {name!r}; valid strategies: {', '.join(STRATEGIES)}") from None


def check_cold_start(name: str) -> str:
    """`name` if it works without a trained model, else a ValueError naming those that do."""
    if not get_strategy(name).cold_start:
        raise ValueError(
            f"cold-start strategy must be one of {', '.join(COLD_START_STRATEGIES)}, got {name!r}"
        )
    return name
