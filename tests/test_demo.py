"""The demo (`python -m rcpo_losses.demo`) and its dependency-free PNG plotting."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch

from rcpo_losses import demo, mallows_rmj_topk, mnl_topk
from rcpo_losses.ranks import all_pairs, ranks_from_scores, top_bottom_pair

TINY = ["--sizes", "8", "16", "--seeds", "0", "1", "--epochs", "15", "--lrs", "0.03", "0.1"]
TINY += ["--val-prompts", "20", "--test-prompts", "30", "--pool", "16", "--quiet"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """demo.main sets torch's thread count (--threads, default 1); the tests after these run with the suite's."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read_png(path) -> np.ndarray:
    """The image matplotlib wrote, ``[H, W, C]`` floats in [0, 1]."""
    image = pytest.importorskip("matplotlib.image")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return image.imread(path)


def test_main_tiny_writes_png_table_and_json(tmp_path, capsys):
    png, js = tmp_path / "demo.png", tmp_path / "demo.json"
    assert demo.main([*TINY, "--noise", "mnl", "mallows", "--out", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    results = json.loads(js.read_text())
    names = [demo.REFERENCE] + [o.name for o in demo.objectives(2)]
    assert results["objectives"] == names
    for name in names:
        assert name in out
    assert "Kendall tau" in out and "top-1 agreement" in out
    cells = {(r["noise"], r["objective"], r["n_train"], r["seed"]) for r in results["records"]}
    assert cells == {(n, o, s, seed) for n in ("mnl", "mallows") for o in names for s in (8, 16) for seed in (0, 1)}
    for rec in results["records"]:
        assert -1.0 <= rec["kendall_tau"] <= 1.0 and 0.0 <= rec["top1"] <= 1.0
        assert rec["lr"] in (None, 0.03, 0.1)
    assert set(results["phi"]) == {"mallows"} and 0 < results["phi"]["mallows"] < 1
    image = read_png(png)
    assert image.shape[1] >= 900 and image.shape[0] >= 700
    assert (image[..., :3] < 0.9).any(-1).mean() > 0.02  # something was drawn
    assert f"plot: {png}" in out


def test_ablation_and_rmj_noise_run(tmp_path, capsys):
    png = tmp_path / "a.png"
    assert demo.main([*TINY, "--noise", "rmj", "--sizes", "8", "--ablation", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Mallows-RMJ noise" in out and "RMJ top-2 unit weights" in out and "Mallows AllPairs" in out
    read_png(png)


def test_deterministic_given_seed():
    cfg = demo.parse_args([*TINY, "--noise", "mallows", "--sizes", "8"])
    first, second = demo.run_experiment(cfg), demo.run_experiment(cfg)
    assert first["records"] == second["records"]


def test_trained_objectives_beat_the_reference():
    cfg = demo.parse_args(["--sizes", "128", "--seeds", "0", "--epochs", "60", "--lrs", "0.05", "--val-prompts", "50"])
    cfg.noise = list(demo.NOISES)
    cfg.quiet = True
    results = demo.run_experiment(cfg)
    tau = {(r["noise"], r["objective"]): r["kendall_tau"] for r in results["records"]}
    for noise in demo.NOISES:
        reference = tau[(noise, demo.REFERENCE)]
        for obj in demo.objectives(2):
            assert tau[(noise, obj.name)] > reference + 0.3, (noise, obj.name, tau[(noise, obj.name)], reference)
            assert tau[(noise, obj.name)] > 0.4


def test_pairwise_wiring_matches_rank_tensors():
    """The pairwise objectives' chosen/rejected picks are the library's top-bottom / all-pairs ranks."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 5, generator=g)
    runs = demo.Runs([6], torch.zeros(1, dtype=torch.long), torch.zeros(6, dtype=torch.long), scores)
    pol, ref = torch.randn(2, 6, 5, generator=g), torch.randn(6, 5, generator=g)
    objs = {o.name: o for o in demo.objectives(2)}
    loss, unit_run = demo.make_loss(objs["DPO top-bottom"], runs, 2, 0.5, 1.0)
    want = torch.stack([mnl_topk(p, ref, top_bottom_pair(scores), beta=0.5, reduction="none") for p in pol])
    torch.testing.assert_close(loss(pol, ref, True), want)
    loss, unit_run = demo.make_loss(objs["Mallows-RMJ pairwise"], runs, 2, 0.5, 2.0)
    tb = top_bottom_pair(scores)
    want = torch.stack([mallows_rmj_topk(p, ref, tb, beta=0.5, neg_log_phi=2.0, reduction="none") for p in pol])
    torch.testing.assert_close(loss(pol, ref, True), want)
    pairs = all_pairs(ranks_from_scores(scores, 2))
    loss, unit_run = demo.make_loss(objs["DPO-AllPairs"], runs, 2, 0.5, 1.0)
    want = torch.stack([mnl_topk(p[pairs.row], ref[pairs.row], pairs.ranks, beta=0.5, reduction="none") for p in pol])
    torch.testing.assert_close(loss(pol, ref, True), want)
    assert unit_run.shape == (len(pairs.row),) and len(pairs.row) == 6 * (1 + 2 * 3)
    # Ablation: Mallows-RMJ's comparisons with unit weights. With k = 1 that is Mallows-RMJ discrete.
    ablation = {o.name: o for o in demo.objectives(1, ablation=True)}
    loss, unit_run = demo.make_loss(ablation["RMJ top-1 unit weights"], runs, 1, 0.5, 2.0)
    ranks = ranks_from_scores(scores, 1)
    want = torch.stack([mallows_rmj_topk(p, ref, ranks, beta=0.5, neg_log_phi=2.0, reduction="none") for p in pol])
    torch.testing.assert_close(loss(pol, ref, True).view(2, 6, 4).sum(-1), want)


@pytest.mark.parametrize("distance", ["kendall", "rmj"])
def test_mallows_annotator_samples_its_model(distance):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(30000, 3, generator=g)
    scores = demo.mallows_annotator(r, 0.5, distance, g)
    assert sorted(scores[0].tolist()) == [-2.0, -1.0, 0.0]  # minus the place of each response
    true_rank = r.argsort(-1, descending=True).argsort(-1)
    placed = true_rank.gather(-1, scores.argsort(-1, descending=True))  # true rank of the 1st, 2nd, 3rd pick
    perms, probs = demo.mallows_probs(0.5, 3, distance)
    freq = torch.stack([(placed == p).all(-1).double().mean() for p in perms])
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    # kendall: phi^(inversions); rmj: a swap of the top two costs phi^2, of the bottom two phi^1
    want = {"kendall": [0, 1, 1, 2, 2, 3], "rmj": [0, 1, 2, 1, 2, 3]}[distance]
    assert demo.mallows_distance(perms, distance).tolist() == want


def test_annotator_calibration_and_metrics():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(20000, 5, generator=g)
    for distance in ("kendall", "rmj"):
        phi = demo.calibrate_phi(0.6, 5, distance)
        assert demo.mallows_mean_tau(phi, 5, distance) == pytest.approx(0.6, abs=1e-6)
        scores = demo.mallows_annotator(r, phi, distance, g)
        assert demo.kendall_tau(scores, r).mean().item() == pytest.approx(0.6, abs=0.01)
        assert demo.kendall_tau(demo.mallows_annotator(r[:50], 1e-9, distance, g), r[:50]).min() == 1.0
    mnl = demo.gumbel_annotator(10 * r, g)  # little noise: mostly the true order
    assert demo.kendall_tau(mnl, r).mean() > 0.8
    assert demo.kendall_tau(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == -1.0
    assert demo.kendall_tau(torch.tensor([1.0, 1.0, 3.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(2 / 3)
    assert demo.top1_agreement(
        torch.tensor([[0.0, 2.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    ).tolist() == [1.0, 0.0]


def test_cli_rejects_bad_settings(capsys):
    for argv in (["--k", "9"], ["--set-size", "9"], ["--phi", "2"], ["--lrs", "0"]):
        with pytest.raises(SystemExit):
            demo.parse_args(argv)
    assert demo.parse_args(["--set-size", "9", "--noise", "mnl"]).set_size == 9  # no enumeration needed


def test_without_matplotlib_prints_the_table_and_names_the_extra(tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.lines"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails, as when matplotlib is not installed
    png = tmp_path / "demo.png"
    assert demo.main([*TINY, "--noise", "mnl", "--sizes", "8", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Kendall tau" in out and "MNL top-2" in out
    assert 'pip install "rcpo-losses[demo]"' in out and not png.exists()


def test_progress_bar_on_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = demo.progress_bar(4, file=stream)
    bar.set_description("MNL top-2, mnl noise")
    for _ in range(4):
        bar.update()
    bar.close()
    text = stream.getvalue()
    assert "100%" in text and "MNL top-2" in text and "4/4" in text
    assert isinstance(demo.progress_bar(4, quiet=True), demo._NoBar)
    plain = io.StringIO()  # not a terminal (a log file): no bar
    bar = demo.progress_bar(4, file=plain)
    bar.update()
    bar.close()
    assert plain.getvalue() == ""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # without tqdm: no bar, no error
    assert isinstance(demo.progress_bar(4, file=stream), demo._NoBar)
