"""File readers: WordPiece + GLUE MRPC for BERT, TF-NMT parallel text for GNMT, image folders and
TFRecords for the CNNs; bad data fails with an error that names the file."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import models
from models import DataError
from models.wordpiece import WordPieceTokenizer, basic_split

DATA = os.path.join(os.path.dirname(__file__), "data")
MRPC = os.path.join(DATA, "mrpc")
IWSLT = os.path.join(DATA, "iwslt15-en-vi-sample")
TRAIN_PREFIX = os.path.join(IWSLT, "iwslt15.tst2013.100")
VOCAB_PREFIX = os.path.join(IWSLT, "iwslt15.vocab.100")


# ---- WordPiece / MRPC ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return WordPieceTokenizer(os.path.join(MRPC, "vocab-uncased.txt"))


def test_basic_split_lowercases_strips_accents_and_splits_punctuation():
    assert basic_split("Héllo, WORLD!\tit's $2.5") == [
        "hello",
        ",",
        "world",
        "!",
        "it",
        "'",
        "s",
        "$",
        "2",
        ".",
        "5",
    ]


def test_wordpiece_uses_longest_vocabulary_prefixes_and_unk(tokenizer):
    assert tokenizer.tokenize("Amrozi accused his brother") == [
        "am",
        "##ro",
        "##zi",
        "accused",
        "his",
        "brother",
    ]
    assert tokenizer.tokenize("\u2603\u2603\u2603") == ["[UNK]"]
    ids = tokenizer.ids(["[CLS]", "the", "[SEP]"])
    assert ids == [101, 1996, 102]


def test_mrpc_reader_builds_cls_a_sep_b_sep_with_segments_and_labels(tokenizer):
    spec = models.get_model("bert", "tiny", vocab_size=30522, seq_length=64)
    batch = next(spec.input_fn(MRPC, batch_size=4, shuffle=False))
    assert spec.check_batch(batch) == 4
    assert list(batch["label"]) == [1, 0, 1, 0]  # first rows of train.tsv
    row = batch["input_ids"][0]
    n = batch["input_mask"][0].sum()
    expected = (
        ["[CLS]"]
        + tokenizer.tokenize(
            'Amrozi accused his brother, whom he called "the witness", of deliberately distorting '
            "his evidence."
        )
        + ["[SEP]"]
    )
    assert list(row[: len(expected)]) == tokenizer.ids(expected)
    assert row[n - 1] == 102 and (row[n:] == 0).all()
    segments = batch["segment_ids"][0]
    assert (segments[: len(expected)] == 0).all() and (segments[len(expected) : n] == 1).all()


def test_mrpc_reader_truncates_long_pairs_to_seq_length():
    spec = models.get_model("bert", "tiny", vocab_size=30522, seq_length=16)
    batch = next(spec.input_fn(MRPC, batch_size=8, shuffle=False))
    assert batch["input_ids"].shape == (8, 16)
    assert (batch["input_mask"].sum(1) == 16).all()
    assert ((batch["input_ids"] == 102).sum(1) == 2).all()  # both [SEP]s survive


def test_bert_reader_rejects_a_vocabulary_larger_than_the_model():
    spec = models.get_model("bert", "tiny")  # vocab_size 128
    with pytest.raises(
        DataError,
        match=r"vocab-uncased.txt has 30522 tokens but bert/tiny has "
        r"vocab_size 128.*vocab_size=30522",
    ):
        spec.input_fn(MRPC, batch_size=4)


def test_bert_reader_names_a_missing_tsv(tmp_path):
    shutil.copy(os.path.join(MRPC, "vocab-uncased.txt"), tmp_path)
    spec = models.get_model("bert", "tiny", vocab_size=30522)
    with pytest.raises(DataError, match=f"GLUE TSV file {tmp_path}/train.tsv does not exist"):
        spec.input_fn(str(tmp_path), batch_size=4)


def test_bert_reader_names_an_empty_vocabulary(tmp_path):
    (tmp_path / "vocab.txt").write_text("")
    spec = models.get_model("bert", "tiny", vocab_size=30522)
    with pytest.raises(DataError, match=f"WordPiece vocabulary file {tmp_path}/vocab.txt is empty"):
        spec.input_fn(str(tmp_path), batch_size=4)


def test_bert_reader_names_the_line_of_a_malformed_row(tmp_path):
    shutil.copy(os.path.join(MRPC, "vocab-uncased.txt"), tmp_path)
    with open(os.path.join(MRPC, "train.tsv"), encoding="utf-8-sig") as f:
        lines = f.read().splitlines()[:4]
    lines[3] = "1\t123\tonly three fields"
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    spec = models.get_model("bert", "tiny", vocab_size=30522)
    with pytest.raises(DataError, match=r"train.tsv:4: expected 5 tab-separated fields.*found 3"):
        spec.input_fn(str(tmp_path), batch_size=2)


def test_bert_reader_rejects_a_file_without_the_glue_header(tmp_path):
    shutil.copy(os.path.join(MRPC, "vocab-uncased.txt"), tmp_path)
    (tmp_path / "train.tsv").write_text("1\t1\t2\ta\tb\n")
    spec = models.get_model("bert", "tiny", vocab_size=30522)
    with pytest.raises(DataError, match=r"train.tsv:1: expected the header"):
        spec.input_fn(str(tmp_path), batch_size=1)


def test_reader_with_fewer_examples_than_a_batch_says_so():
    spec = models.get_model("bert", "tiny", vocab_size=30522)
    with pytest.raises(DataError, match="has 3 usable examples, fewer than one batch of 4"):
        next(spec.input_fn(MRPC, batch_size=4, max_rows=3))


# ---- GNMT / IWSLT ------------------------------------------------------------------------------


def _gnmt(**overrides):
    return models.get_model("gnmt", "tiny", src_vocab_size=100, tgt_vocab_size=100, **overrides)


def test_iwslt_reader_maps_tokens_to_ids_with_sos_eos_and_lengths():
    spec = _gnmt(src_length=12, tgt_length=12)
    batch = next(spec.input_fn(TRAIN_PREFIX, VOCAB_PREFIX, batch_size=2, shuffle=False))
    assert spec.check_batch(batch) == 2
    with open(VOCAB_PREFIX + ".vi", encoding="utf-8") as f:
        vi = {t: i for i, t in enumerate(f.read().split("\n")) if t}
    # Second pair: "Tôi đã rất tự hào về đất nước tôi ." (10 tokens)
    words = "Tôi đã rất tự hào về đất nước tôi .".split()
    ids = [vi.get(w, 0) for w in words]
    assert batch["target_length"][1] == 11
    assert list(batch["target_input_ids"][1, :11]) == [1] + ids
    assert list(batch["target_output_ids"][1, :11]) == ids + [2]
    assert batch["source_length"][1] == len("And I was very proud .".split())
    # First pair is longer than 12 tokens: truncated, </s> still closes the target.
    assert batch["source_length"][0] == 12 and batch["target_length"][0] == 12
    assert batch["target_output_ids"][0, 11] == 2


def test_gnmt_reader_rejects_a_vocabulary_larger_than_the_model():
    spec = models.get_model("gnmt", "tiny")  # vocab 64
    with pytest.raises(
        DataError,
        match=r"iwslt15.vocab.100.en has 100 tokens but gnmt/tiny has "
        r"vocab_size 64",
    ):
        spec.input_fn(TRAIN_PREFIX, VOCAB_PREFIX, batch_size=2)


def test_gnmt_reader_requires_unk_sos_eos_at_the_top_of_the_vocabulary(tmp_path):
    for lang in ("en", "vi"):
        (tmp_path / f"vocab.{lang}").write_text("hello\n<unk>\n<s>\n</s>\n")
    with pytest.raises(DataError, match=r"vocab.en must start with the lines <unk>, <s>, </s>"):
        _gnmt().input_fn(TRAIN_PREFIX, str(tmp_path / "vocab"), batch_size=2)


def test_gnmt_reader_names_parallel_files_of_different_lengths(tmp_path):
    (tmp_path / "train.en").write_text("a b\nc d\n")
    (tmp_path / "train.vi").write_text("x y\n")
    with pytest.raises(DataError, match=r"train.en has 2 lines, .*train.vi has 1"):
        _gnmt().input_fn(str(tmp_path / "train"), VOCAB_PREFIX, batch_size=1)


def test_gnmt_reader_names_a_missing_and_an_empty_text_file(tmp_path):
    with pytest.raises(DataError, match=f"source text file {tmp_path}/train.en does not exist"):
        _gnmt().input_fn(str(tmp_path / "train"), VOCAB_PREFIX, batch_size=1)
    (tmp_path / "train.en").write_text("\n\n")
    (tmp_path / "train.vi").write_text("x\n")
    with pytest.raises(DataError, match=f"source text file {tmp_path}/train.en is empty"):
        _gnmt().input_fn(str(tmp_path / "train"), VOCAB_PREFIX, batch_size=1)


# ---- images --------------------------------------------------------------------------------------


def _png_bytes(color, size=(20, 12)):
    import io
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_reader_labels_subfolders_in_sorted_order(tmp_path):
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(2):
            (tmp_path / cls / f"{i}.png").write_bytes(_png_bytes(color))
    spec = models.get_model("vgg19", "tiny")
    batch = next(spec.input_fn(str(tmp_path), batch_size=4, shuffle=False))
    assert spec.check_batch(batch) == 4
    assert list(batch["label"]) == [0, 0, 1, 1]
    red = batch["image"][0]
    assert red.shape == (32, 32, 3)
    assert red[..., 0].mean() > 2 and red[..., 2].mean() < -1  # normalised red vs blue


def test_tfrecord_reader_decodes_examples_and_applies_the_label_offset(tmp_path):
    path = str(tmp_path / "train-00000")
    with tf.io.TFRecordWriter(path) as w:
        for label in (1, 2, 3):
            ex = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "image/encoded": tf.train.Feature(
                            bytes_list=tf.train.BytesList(value=[_png_bytes((label * 50, 0, 0))])
                        ),
                        "image/class/label": tf.train.Feature(
                            int64_list=tf.train.Int64List(value=[label])
                        ),
                    }
                )
            )
            w.write(ex.SerializeToString())
    spec = models.get_model("amoebanet", "tiny")
    batch = next(spec.input_fn(path, batch_size=3, shuffle=False, label_offset=1))
    assert list(batch["label"]) == [0, 1, 2]
    assert batch["image"].shape == (3, 32, 32, 3)


def test_tfrecord_reader_names_the_record_missing_a_feature(tmp_path):
    path = str(tmp_path / "bad.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        ex = tf.train.Example(
            features=tf.train.Features(
                feature={
                    "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))
                }
            )
        )
        w.write(ex.SerializeToString())
    with pytest.raises(
        DataError,
        match=r"bad.tfrecord record 0: expected features "
        r"'image/encoded' and 'image/class/label'",
    ):
        models.get_model("vgg19", "tiny").input_fn(path, batch_size=1)


def test_image_readers_name_a_missing_file_an_undecodable_image_and_an_empty_folder(tmp_path):
    spec = models.get_model("vgg19", "tiny")
    with pytest.raises(DataError, match=f"TFRecord file {tmp_path}/none.tfrecord does not exist"):
        spec.input_fn(str(tmp_path / "none.tfrecord"), batch_size=1)
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="has class subfolders \\['a'\\] but no image files"):
        spec.input_fn(str(tmp_path), batch_size=1)
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"{tmp_path}/a/broken.png: cannot decode image"):
        spec.input_fn(str(tmp_path), batch_size=1)


def test_synthetic_images_have_the_feature_spec_shape():
    spec = models.get_model("vgg19", "tiny")
    batch = spec.synthetic_batch(3, np.random.default_rng(0))
    assert batch["image"].shape == (3, 32, 32, 3) and batch["label"].shape == (3,)


def test_wordpiece_vocabulary_without_bert_special_tokens_is_rejected_by_name(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nthe\n")
    with pytest.raises(
        DataError,
        match=r"vocab.txt lacks the special tokens \['\[CLS\]', "
        r"'\[SEP\]', '\[MASK\]'\]",
    ):
        WordPieceTokenizer(str(tmp_path / "vocab.txt"))


def test_vocabulary_with_a_repeated_token_names_both_lines(tmp_path):
    for lang in ("en", "vi"):
        (tmp_path / f"vocab.{lang}").write_text("<unk>\n<s>\n</s>\nhello\nhello\n")
    with pytest.raises(DataError, match=r"vocab.en:5: token 'hello' repeats line 4"):
        _gnmt().input_fn(TRAIN_PREFIX, str(tmp_path / "vocab"), batch_size=1)
