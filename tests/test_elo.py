"""Elo and Bradley-Terry ratings."""

import json

import numpy as np
import pytest

from jrlhf import elo


def test_elo_hand_computed_updates():
    # Equal ratings: expected 0.5, winner +16 with k=32.
    r = elo.elo_ratings([("a", "b", "a")])
    assert r == {"a": 1016.0, "b": 984.0}
    # Then b (984) beats a (1016): E_b = 1 / (1 + 10^(32/400)) = 0.45405; b gains 32 * 0.54595.
    r = elo.elo_ratings([("a", "b", "a"), ("a", "b", "b")])
    np.testing.assert_allclose(r["b"], 984 + 32 * (1 - 1 / (1 + 10 ** (32 / 400))), rtol=1e-12)
    np.testing.assert_allclose(r["a"] + r["b"], 2000.0)
    # A tie between equals changes nothing.
    assert elo.elo_ratings([("a", "b", "tie")]) == {"a": 1000.0, "b": 1000.0}
    with pytest.raises(ValueError, match="'c'"):
        elo.elo_ratings([("a", "b", "c")])


def test_elo_depends_on_order_bradley_terry_does_not():
    games = [("a", "b", "a")] * 5 + [("a", "b", "b")] * 5
    assert elo.elo_ratings(games) != elo.elo_ratings(games[::-1])
    bt1, bt2 = elo.bradley_terry(games), elo.bradley_terry(games[::-1])
    for k in bt1:
        np.testing.assert_allclose(bt1[k], bt2[k], atol=1e-6)
    np.testing.assert_allclose(bt1["a"], 1000.0, atol=1e-6)


def test_bradley_terry_recovers_planted_strengths():
    rng = np.random.default_rng(0)
    true = {"sft": 1000.0, "ppo_1": 1100.0, "ppo_2": 1250.0, "base": 900.0}
    names = list(true)
    games = []
    for _ in range(4000):
        a, b = rng.choice(names, 2, replace=False)
        p = elo.elo_expected(true[a], true[b])
        games.append((a, b, "a" if rng.random() < p else "b"))
    fit = elo.bradley_terry(games, prior=0.0)
    shift = np.mean([fit[n] - true[n] for n in names])
    for n in names:
        assert abs(fit[n] - shift - true[n]) < 25, (n, fit[n] - shift, true[n])
    ci = elo.bootstrap_intervals(games, samples=50, seed=1, prior=0.0)
    for n in names:
        lo, hi = ci[n]
        assert lo < fit[n] < hi and hi - lo < 80


def test_undefeated_player_gets_finite_rating_and_leaderboard(tmp_path):
    games = [("v2", "v1", "a")] * 3 + [("v1", "v0", "tie")]
    rows = elo.leaderboard(games, samples=20)
    assert rows[0]["name"] == "v2"
    # v1 and v0 only tied each other: the maximum-likelihood fit gives them equal ratings.
    np.testing.assert_allclose(rows[1]["rating"], rows[2]["rating"], atol=1e-6)
    assert all(np.isfinite(r["rating"]) for r in rows)
    assert rows[0]["wins"] == 3 and rows[1]["ties"] == rows[2]["ties"] == 1
    text = elo.format_leaderboard(rows)
    assert "v2" in text.splitlines()[1]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"a": "x", "b": "y", "winner": "x"}, {"a": "x", "b": "y", "winner": "tie"},
        {"a": "x", "b": "y", "winner": "b"}]))
    assert elo.read_games(path) == [("x", "y", "a"), ("x", "y", "tie"), ("x", "y", "b")]
    path.write_text(json.dumps({"a": "x", "b": "y", "winner": "z"}))
    with pytest.raises(ValueError, match=r"c.jsonl:1: field 'winner': is 'z'"):
        elo.read_games(path)
