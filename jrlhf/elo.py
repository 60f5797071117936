"""Ratings for comparing model versions from pairwise judgements.

`elo_ratings` is the classic sequential Elo update (it depends on the order of the games).
`bradley_terry` is the order-independent maximum-likelihood fit of the same model
(P(a beats b) = 1 / (1 + 10^((R_b - R_a) / 400))), with bootstrap confidence intervals: use it to
compare versions. A tie counts as half a win for each side.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

Game = tuple[str, str, str]  # (a, b, outcome) with outcome "a", "b" or "tie"
ELO_SCALE = 400.0 / math.log(10.0)  # natural-log strength -> Elo points


def _score(outcome: str) -> float:
    if outcome not in ("a", "b", "tie"):
        raise ValueError(f"game outcome must be 'a', 'b' or 'tie', got {outcome!r}")
    return {"a": 1.0, "b": 0.0, "tie": 0.5}[outcome]


def elo_expected(rating_a: float, rating_b: float) -> float:
    """Expected score of a against b."""
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / 400.0))


def elo_ratings(games: Iterable[Game], k: float = 32.0, initial: float = 1000.0):
    """Sequential Elo: each game moves both ratings by k · (score − expected)."""
    ratings: dict[str, float] = {}
    for a, b, outcome in games:
        ra, rb = ratings.setdefault(a, initial), ratings.setdefault(b, initial)
        delta = k * (_score(outcome) - elo_expected(ra, rb))
        ratings[a], ratings[b] = ra + delta, rb - delta
    return ratings


def bradley_terry(games: Sequence[Game], *, prior: float = 0.1, iterations: int = 10_000,
                  tol: float = 1e-12, initial: float = 1000.0) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry ratings on the Elo scale (mean = `initial`).

    Fitted with Hunter's MM algorithm; `prior` adds that many virtual ties between every pair
    that met, so a player who never lost still gets a finite rating.
    """
    names = sorted({n for a, b, _ in games for n in (a, b)})
    index = {n: i for i, n in enumerate(names)}
    n = len(names)
    wins = np.zeros(n)
    meetings = np.zeros((n, n))
    for a, b, outcome in games:
        i, j = index[a], index[b]
        s = _score(outcome)
        wins[i] += s
        wins[j] += 1.0 - s
        meetings[i, j] += 1
        meetings[j, i] += 1
    met = meetings > 0
    wins += 0.5 * prior * met.sum(1)  # `prior` ties per opponent met: half a win each
    meetings += prior * met
    strength = np.ones(n)
    for _ in range(iterations):
        denom = (meetings / (strength[:, None] + strength[None, :])).sum(1)
        new = wins / np.maximum(denom, 1e-300)
        new /= np.exp(np.mean(np.log(new)))
        if np.max(np.abs(new - strength)) < tol:
            strength = new
            break
        strength = new
    return {name: initial + ELO_SCALE * math.log(strength[index[name]]) for name in names}


def bootstrap_intervals(games: Sequence[Game], *, samples: int = 200, seed: int = 0,
                        confidence: float = 0.95, **fit_kwargs):
    """`{name: (low, high)}` percentile intervals of `bradley_terry` over resampled games."""
    rng = np.random.default_rng(seed)
    games = list(games)
    draws: dict[str, list[float]] = {}
    for _ in range(samples):
        sample = [games[i] for i in rng.integers(0, len(games), len(games))]
        for name, rating in bradley_terry(sample, **fit_kwargs).items():
            draws.setdefault(name, []).append(rating)
    lo, hi = (1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100
    return {name: (float(np.percentile(v, lo)), float(np.percentile(v, hi)))
            for name, v in draws.items()}


def leaderboard(games: Sequence[Game], *, samples: int = 200, seed: int = 0) -> list[dict]:
    """Rows sorted by Bradley-Terry rating: name, rating, ci, elo (sequential), record."""
    bt = bradley_terry(games)
    ci = bootstrap_intervals(games, samples=samples, seed=seed) if samples else {}
    elo = elo_ratings(games)
    record = {name: [0, 0, 0] for name in bt}
    for a, b, outcome in games:
        if outcome == "tie":
            record[a][2] += 1
            record[b][2] += 1
        else:
            winner, loser = (a, b) if outcome == "a" else (b, a)
            record[winner][0] += 1
            record[loser][1] += 1
    rows = [{"name": name, "rating": bt[name], "ci": ci.get(name), "elo": elo[name],
             "wins": record[name][0], "losses": record[name][1], "ties": record[name][2]}
            for name in bt]
    return sorted(rows, key=lambda r: -r["rating"])


def format_leaderboard(rows: list[dict]) -> str:
    lines = [f"{'#':>2}  {'model':<24} {'BT rating':>9}  {'95% CI':>15}  {'Elo':>6}  W-L-T"]
    for i, r in enumerate(rows, 1):
        ci = f"{r['ci'][0]:.0f}..{r['ci'][1]:.0f}" if r["ci"] else "-"
        lines.append(f"{i:>2}  {r['name']:<24} {r['rating']:>9.1f}  {ci:>15}  {r['elo']:>6.1f}  "
                     f"{r['wins']}-{r['losses']}-{r['ties']}")
    return "\n".join(lines)


def read_games(path: str | os.PathLike) -> list[Game]:
    """Games from JSONL rows `{"a": name, "b": name, "winner": "a" | "b" | "tie" | name}`."""
    from jrlhf.data.rows import BadRow, read_rows

    games = []
    for line_no, row in read_rows(path):
        if isinstance(row, BadRow):
            raise row
        for key in ("a", "b", "winner"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str):
                raise BadRow(path, line_no, key, "missing or not a string")
        a, b, w = row["a"], row["b"], row["winner"]
        outcome = {a: "a", b: "b"}.get(w, w)
        if outcome not in ("a", "b", "tie"):
            raise BadRow(path, line_no, "winner",
                         f"is {w!r}; expected 'a', 'b', 'tie', {a!r} or {b!r}")
        games.append((a, b, outcome))
    if not games:
        raise ValueError(f"{Path(path)}: no games")
    return games
