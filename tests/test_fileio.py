"""Crash-safe writers (purify_fast.fileio): the old file or the whole new one, never a part, and
no temporary file left behind on failure."""

import os

import pytest

from purify_fast import fileio


def test_atomic_write_bytes_replaces_whole_file(tmp_path):
    path = tmp_path / "a.json"
    fileio.atomic_write_bytes(path, b"old")
    fileio.atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["a.json"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    fileio.atomic_write_bytes(path, b"old")

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", no_rename)
    with pytest.raises(OSError, match="No space"):
        fileio.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.json"]


def _model(payload):
    def write(d):
        (d / "config.json").write_text("{}")
        (d / payload).write_bytes(b"1")
    return write


def test_atomic_save_dir_swaps_in_complete_directory(tmp_path):
    out = tmp_path / "model"
    fileio.atomic_save_dir(out, _model("w.bin"))
    fileio.atomic_save_dir(out, _model("v.bin"))
    # the old directory was replaced, not merged
    assert sorted(os.listdir(out)) == ["config.json", "v.bin"]

    def broken(d):
        (d / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        fileio.atomic_save_dir(out, broken)
    assert sorted(os.listdir(out)) == ["config.json", "v.bin"]
    assert os.listdir(tmp_path) == ["model"]


def test_atomic_save_dir_never_swaps_away_what_is_not_an_output(tmp_path):
    """A mistyped output path naming a file or an unrelated directory is refused before anything
    is written; an empty directory or an earlier output (config.json / report.json) is replaced."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("precious")
    with pytest.raises(FileExistsError, match="notes.txt exists and is not a directory"):
        fileio.atomic_save_dir(a_file, _model("w.bin"))
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="is not an output directory"):
        fileio.atomic_save_dir(home, _model("w.bin"))
    assert a_file.read_text() == "precious" and (home / "thesis.tex").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["home", "notes.txt"]  # no temp directory left
    empty = tmp_path / "empty"
    empty.mkdir()
    fileio.atomic_save_dir(empty, _model("w.bin"))
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text("{}")
    fileio.atomic_save_dir(report, _model("w.bin"))
    assert (empty / "w.bin").is_file() and (report / "w.bin").is_file()


def test_atomic_save_dir_output_has_the_normal_directory_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        out = fileio.atomic_save_dir(tmp_path / "m", _model("w.bin"))
    finally:
        os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o755  # not mkdtemp's private 0700
    for f in out.iterdir():
        assert (f.stat().st_mode & 0o777) == 0o644, f


def test_signals_are_held_through_the_swap(tmp_path):
    """A signal that arrives while the old output is being swapped out and deleted runs its
    handler only afterwards: the new output is complete and no old copy is left beside it."""
    import signal

    seen = []

    def handler(signum, frame):
        seen.append(sorted(os.listdir(tmp_path)))

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        fileio.atomic_save_dir(tmp_path / "m", _model("w.bin"))
        real_rmtree = fileio.shutil.rmtree

        def rmtree_with_a_signal(path, *a, **k):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the clean-up
            assert seen == []  # held
            return real_rmtree(path, *a, **k)

        fileio.shutil.rmtree = rmtree_with_a_signal
        try:
            fileio.atomic_save_dir(tmp_path / "m", _model("v.bin"))
        finally:
            fileio.shutil.rmtree = real_rmtree
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [["m"]]  # ran after the old copy was gone
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "v.bin"]


def test_a_valid_long_file_name_can_be_written_atomically(tmp_path, monkeypatch):
    """The temporary name was the target's plus ~16 characters, so a valid 250-character name
    failed with ENAMETOOLONG; it is short now, and still cleaned up when the write fails."""
    path = tmp_path / ("r" * 245 + ".json")
    fileio.atomic_write_bytes(path, b"{}")
    assert path.read_bytes() == b"{}" and os.listdir(tmp_path) == [path.name]

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)  # the disk fills up before the rename
    with pytest.raises(OSError, match="No space"):
        fileio.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"{}" and os.listdir(tmp_path) == [path.name]


def test_atomic_write_files_writes_all_or_none(tmp_path, monkeypatch):
    fileio.atomic_write_files(tmp_path, {"a": b"1", "b": b"2", "stale": b"s"})
    calls = []
    real = fileio._write_temp

    def second_fails(directory, data):
        calls.append(data)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(directory, data)

    monkeypatch.setattr(fileio, "_write_temp", second_fails)
    with pytest.raises(OSError, match="No space"):
        fileio.atomic_write_files(tmp_path, {"a": b"new", "b": b"new"}, remove=["stale"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {"a": b"1", "b": b"2",
                                                                    "stale": b"s"}
    monkeypatch.setattr(fileio, "_write_temp", real)
    fileio.atomic_write_files(tmp_path, {"a": b"new", "b": b"new"}, remove=["stale"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {"a": b"new", "b": b"new"}


# --- report writers (purify_fast.report, and the purify CLI's report JSON) -----------------

def _strict_json(text):
    import json

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_report_json_writes_non_finite_floats_as_null(tmp_path):
    """Bare NaN / Infinity tokens are not JSON (JavaScript's JSON.parse, jq reject them)."""
    import numpy as np

    from purify_fast import report

    obj = {"loss": float("nan"), "inf": [float("inf"), -float("inf")], "ok": 0.5,
           "np": np.float64("nan"), "nested": ({"x": float("nan")},)}
    path = report.write_json(tmp_path / "r.json", obj)
    assert _strict_json(path.read_text()) == {"loss": None, "inf": [None, None], "ok": 0.5,
                                              "np": None, "nested": [{"x": None}]}
    paths = report.write_report(tmp_path / "rep", [{"name": "a", "cacc": float("nan"),
                                                    "asr": 0.5, "seconds": float("inf")}],
                                details={"loss": float("nan")})
    got = _strict_json(paths["json"].read_text())
    assert got["rows"][0]["cacc"] is None and got["details"]["loss"] is None


def test_the_purify_cli_report_json_is_strict(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from purify_fast.models.loading import save_pretrained_atomic

    model = BertForSequenceClassification(BertConfig(
        vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, num_labels=2))
    out = save_pretrained_atomic(model, tmp_path / "m", extra_json={
        "purify_fast_report.json": {"dev_acc": float("nan"), "history": [{"loss": float("inf")}]}})
    assert _strict_json((out / "purify_fast_report.json").read_text()) == {
        "dev_acc": None, "history": [{"loss": None}]}


def test_markdown_table_escapes_names_and_shows_missing_values_alike():
    from purify_fast.report import markdown_table

    md = markdown_table([{"name": "fine|mixing", "cacc": float("nan"), "asr": 0.5,
                          "seconds": float("nan")},
                         {"name": 7, "cacc": 0.5, "asr": None, "seconds": None}])
    assert "| fine\\|mixing | – | 50.0 | – |" in md
    assert "| 7 | 50.0 | – | – |" in md
    for row in ({"name": None, "cacc": 0.5, "asr": 0.1}, {"cacc": 0.5, "asr": 0.1}):
        with pytest.raises(ValueError, match="row 0 has no name"):
            markdown_table([row])


def test_write_report_replaces_the_files_as_a_set(tmp_path):
    """A report without a sweep removes the sweep plot an earlier report left in the directory;
    a plot that fails to render leaves the earlier report whole (nothing was replaced)."""
    import json

    from purify_fast.report import write_report

    sweep = [{"rho": 0.1, "dev_acc": 0.8}, {"rho": 0.5, "dev_acc": 0.9}]
    write_report(tmp_path, [{"name": "run1", "cacc": 0.9, "asr": 0.5}], sweep=sweep)
    assert sorted(os.listdir(tmp_path)) == ["defenses.png", "report.json", "report.md",
                                            "rho_sweep.png"]
    paths = write_report(tmp_path, [{"name": "run2", "cacc": 0.7, "asr": 0.1}])
    assert sorted(paths) == ["json", "md", "png"]
    assert sorted(os.listdir(tmp_path)) == ["defenses.png", "report.json", "report.md"]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(KeyError):  # (a dev_acc of None no longer fails: that point is left out)
        write_report(tmp_path, [{"name": "run3", "cacc": 0.9, "asr": 0.0}],
                     sweep=[{"dev_acc": 0.5}])  # no rho: the sweep plot cannot render
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert json.loads((tmp_path / "report.json").read_text())["rows"][0]["name"] == "run2"
    # a rho_sweep.png that no report of this writer produced is not touched
    other = tmp_path / "other"
    other.mkdir()
    (other / "rho_sweep.png").write_bytes(b"mine")
    write_report(other, [{"name": "run", "cacc": 0.7, "asr": 0.1}])
    assert (other / "rho_sweep.png").read_bytes() == b"mine"


def test_a_valid_long_directory_name_can_be_saved_atomically(tmp_path):
    """atomic_save_dir's temporaries were '.NAME.tmp-XXXX' / '.NAME.old-XXXX', over the 255-byte
    limit for a valid 250-character output name; their names are capped now."""
    out = tmp_path / ("o" * 250)
    fileio.atomic_save_dir(out, _model("w.bin"))
    fileio.atomic_save_dir(out, _model("v.bin"))  # the old copy is moved aside, then removed
    assert sorted(os.listdir(out)) == ["config.json", "v.bin"]

    def broken(d):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        fileio.atomic_save_dir(out, broken)
    assert os.listdir(tmp_path) == [out.name]  # no temporary left behind


def test_report_json_takes_numpy_scalars_and_0d_tensors_as_numbers():
    """A numpy float32 NaN or a 0-d tensor was written as the string "nan" / "tensor(inf)"; a NaN
    dict key made the whole dump fail. Keys are strings in JSON: a non-finite one is 'nan' etc."""
    import numpy as np
    import torch

    from purify_fast import report

    obj = {"a": np.float32("nan"), "b": torch.tensor(float("inf")), "c": np.float32(0.5),
           "d": np.int64(3), "e": torch.tensor(2.5), "f": np.bool_(True), "g": torch.tensor(7),
           "h": [np.float16("-inf"), (torch.tensor(float("nan")),)], "i": np.array(1.5)}
    assert _strict_json(report.dumps_json(obj)) == {
        "a": None, "b": None, "c": 0.5, "d": 3, "e": 2.5, "f": True, "g": 7, "h": [None, [None]],
        "i": 1.5}
    keys = {float("nan"): 1, float("inf"): 2, -float("inf"): 3, np.float32(0.5): 4, np.int64(2): 5}
    assert _strict_json(report.dumps_json(keys)) == {"nan": 1, "inf": 2, "-inf": 3, "0.5": 4,
                                                     "2": 5}
    # a longdouble's item() is still numpy (it was written as the string "1.5")
    assert _strict_json(report.dumps_json({"ld": np.longdouble(1.5)})) == {"ld": 1.5}
    with pytest.raises(ValueError, match="two keys are written as 'nan'"):
        report.dumps_json({float("nan"): 1, "nan": 2})  # one entry was dropped silently


def test_report_json_refuses_keys_that_json_writes_alike():
    """JSON keys are strings: 1 and "1" (or True and "true", None and "null") were both written,
    as one key twice, of which a reader keeps only one value. A key json cannot take (a tuple)
    is written as its str(), as values are, where json raised TypeError."""
    from purify_fast import report

    for a, b in ((1, "1"), (True, "true"), (None, "null"), (1.5, "1.5"), ((1, 2), "(1, 2)")):
        with pytest.raises(ValueError, match="two keys are written as"):
            report.dumps_json({a: "x", b: "y"})
    assert _strict_json(report.dumps_json({1: "a", 1.0 + 1: "b", (1, 2): "c", False: "d"})) == {
        "1": "a", "2.0": "b", "(1, 2)": "c", "false": "d"}


# --------------------------------------------------------------------------- plots

def _bar_labels(fig):
    """(text, y) of each value label on the defenses plot, CACC bars first, then ASR."""
    return [(t.get_text(), t.xy[1]) for t in fig.axes[0].texts]


def test_defenses_plot_labels_a_nan_value_na_like_a_missing_one():
    """A NaN CACC / ASR (not measured) is an empty bar labelled n/a: it was labelled "nan" at a
    NaN height (drawn nowhere, so the row showed nothing at all) and a NaN no-trigger rate drew
    a floor line at NaN."""
    from purify_fast.report import _defenses_figure, pyplot

    nan = float("nan")
    fig = _defenses_figure([{"name": "a", "cacc": nan, "asr": nan, "asr_no_trigger": 0.2},
                            {"name": "b", "cacc": 0.5, "asr": 0.4, "asr_no_trigger": nan}], "t")
    try:
        assert _bar_labels(fig) == [("n/a", 0.0), ("50", 50.0), ("n/a", 0.0), ("40", 40.0)]
        assert not fig.axes[0].collections  # neither row has a measured floor to draw
    finally:
        pyplot().close(fig)


def test_defenses_plot_number_is_not_struck_through_by_a_floor_above_its_bar():
    """ASR 14 % with a no-trigger floor of 17 % (the demo's clean reference): the floor line was
    drawn through the bar's number, which sat at the bar's top; it goes above the floor now."""
    from purify_fast.report import _defenses_figure, pyplot

    fig = _defenses_figure([{"name": "ref", "cacc": 0.8, "asr": 0.14, "asr_no_trigger": 0.17},
                            {"name": "bd", "cacc": 0.8, "asr": 1.0, "asr_no_trigger": 0.28}], "t")
    try:
        (_, ref_asr), (_, bd_asr) = _bar_labels(fig)[2:]
        assert ref_asr >= 17.0 - 1e-9  # above the floor line, not at 14
        assert bd_asr == 100.0  # a floor under the bar's top leaves the number where it was
    finally:
        pyplot().close(fig)


def test_defenses_plot_long_names_do_not_squeeze_the_bars():
    """A very long defense name is wrapped (and cut after 3 lines): written on one rotated line
    it ran off the figure's left edge, tight_layout gave up ("Tight layout not applied") and the
    bars were squeezed into a corner."""
    import warnings

    from purify_fast.report import _defenses_figure, pyplot

    long = "a very long defense name that goes on and on (options rho=0.3, eps=1e-3) " * 3
    fig = _defenses_figure([{"name": long, "cacc": 0.9, "asr": 1.0},
                            {"name": "b\nsecond line", "cacc": 0.8, "asr": 0.1}], "t")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fig.tight_layout()
        ax = fig.axes[0]
        assert ax.get_position().width > 0.6 and ax.get_position().height > 0.4
        fig.canvas.draw()
        box = fig.bbox
        for t in ax.get_xticklabels():
            ext = t.get_window_extent(fig.canvas.get_renderer())
            assert ext.x0 >= box.x0 and ext.x1 <= box.x1 and ext.y0 >= box.y0, t.get_text()
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels[1] == "b\nsecond line"
        assert len(labels[0].splitlines()) == 3 and labels[0].endswith("…")
    finally:
        pyplot().close(fig)


def test_rho_sweep_plot_skips_unmeasured_points_and_keeps_the_legend_off_the_data(tmp_path):
    """A sweep point without a dev accuracy (None) crashed the plot (100 * None); a NaN one is
    left out too. The legend sits beside the axes: inside ("best"), its five entries covered
    points and the threshold lines. One rho gets a readable x range, not ±0.015."""
    from purify_fast.report import _sweep_figure, plot_rho_sweep, pyplot

    pts = [{"rho": 0.1, "dev_acc": None, "asr": 0.3}, {"rho": 0.2, "dev_acc": 0.7, "asr": None},
           {"rho": 0.3, "dev_acc": float("nan"), "asr": 1.0}, {"rho": 0.5, "dev_acc": 0.8}]
    assert plot_rho_sweep(pts, tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    fig = _sweep_figure(pts, "t", 0.83, 0.02, 0.2)
    try:
        ax = fig.axes[0]
        acc, asr = ax.lines[:2]
        assert list(acc.get_xdata()) == [0.2, 0.5] and list(asr.get_xdata()) == [0.1, 0.3]
        fig.tight_layout()
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        assert not ax.get_legend().get_window_extent(r).overlaps(ax.get_window_extent(r))
    finally:
        pyplot().close(fig)
    fig = _sweep_figure([{"rho": 0.3, "dev_acc": 0.8, "asr": 1.0}], "t", None, None, 0.3)
    try:
        lo, hi = fig.axes[0].get_xlim()
        assert lo < 0.3 < hi and hi - lo >= 0.2
    finally:
        pyplot().close(fig)
