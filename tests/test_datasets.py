"""Parsers on tiny hand-made files with hand-computed answers, then the real datasets from the mirror."""

import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline import data, download, prepare
from pipeline.data import imdb, mnist, ptb
from pipeline.data.fetch import DownloadError
from tests.conftest import REPO, make_tar, mirror_path, needs_mirror

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: refused at once, so no test depends on internet access


def sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


# --- MNIST's IDX format ---------------------------------------------------------------------------------------
def write_idx(path, magic, dims, payload: bytes):
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(f">i{len(dims)}i", magic, *dims) + payload)
    return path


def test_idx_images_and_labels(tmp_path):
    images = mnist.read_idx(write_idx(tmp_path / "i.gz", 2051, (2, 2, 3), bytes(range(12))))
    np.testing.assert_array_equal(images, [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]])
    assert images.dtype == np.uint8
    labels = mnist.read_idx(write_idx(tmp_path / "l.gz", 2049, (2,), bytes([7, 3])))
    np.testing.assert_array_equal(labels, [7, 3])


def test_idx_rejects_a_wrong_magic_number_and_a_short_payload(tmp_path):
    with pytest.raises(mnist.IDXError, match="magic number 2052"):
        mnist.read_idx(write_idx(tmp_path / "bad.gz", 2052, (2,), bytes(2)))
    with pytest.raises(mnist.IDXError, match=r"header promises \(2, 2, 3\) = 12 bytes, found 11"):
        mnist.read_idx(write_idx(tmp_path / "short.gz", 2051, (2, 2, 3), bytes(11)))


def test_stratified_validation_split_is_exact_and_seeded():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    rest, held = data.split_off(labels, 10, seed=3)
    assert len(held) == 10 and len(rest) == 90 and not set(rest) & set(held)
    assert np.bincount(labels[held]).tolist() == [6, 3, 1]
    np.testing.assert_array_equal(held, data.split_off(labels, 10, seed=3)[1])
    with pytest.raises(ValueError, match="impossible"):
        data.split_off(labels, 100, seed=0)


# --- PTB -----------------------------------------------------------------------------------------------------
def test_ptb_words_vocab_and_ids(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("a b c\nb c\n")
    words = ptb.read_words(text)
    assert words == ["a", "b", "c", "<eos>", "b", "c", "<eos>"]
    vocab = ptb.build_vocab(words, 10)  # by count, ties alphabetical ('<' sorts first); <unk> always present
    assert vocab == ["<eos>", "b", "c", "a", "<unk>"]
    assert ptb.encode(words, vocab).tolist() == [3, 1, 2, 0, 1, 2, 0]
    small = ptb.build_vocab(words, 4)  # 'a' is dropped to keep a slot for <unk>
    assert small == ["<eos>", "b", "c", "<unk>"]
    assert ptb.encode(["a", "b", "zzz"], small).tolist() == [3, 1, 3]


# --- IMDB ----------------------------------------------------------------------------------------------------
REVIEWS = {
    "aclImdb/train/pos/0_9.txt": b"Great movie.<br />Great fun!",
    "aclImdb/train/pos/1_8.txt": b"A great, great film",
    "aclImdb/train/pos/2_7.txt": b"great GREAT",
    "aclImdb/train/neg/0_2.txt": b"Bad movie",
    "aclImdb/train/neg/1_1.txt": b"bad BAD acting",
    "aclImdb/train/neg/2_1.txt": b"bad",
    "aclImdb/test/pos/0_10.txt": b"great acting",
    "aclImdb/test/neg/0_3.txt": b"unseen words, bad",
    "aclImdb/train/unsup/0_0.txt": b"ignored",
    "aclImdb/README": b"readme",
}


def test_imdb_tokenise_truncate_and_pad(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    make_tar(raw / imdb.RAW_NAME, REVIEWS)
    cfg = OmegaConf.create(
        dict(
            name="imdb",
            vocab_size=8,
            max_len=3,
            truncate="pre",
            standardize="lower_and_strip_punctuation",
            val_size=2,
            seed=0,
        )
    )
    ds = imdb.build(cfg, raw)
    vocab = ds.vocab
    assert vocab[:2] == ["<pad>", "[UNK]"] and len(vocab) <= 8 and all(type(w) is str for w in vocab)
    assert vocab[2] == "great"  # at least 4 times in the two training reviews left of each class
    assert "br" not in vocab  # <br /> was removed before tokenising
    ids = {word: i for i, word in enumerate(vocab)}
    unk = 1
    # Test split (file-name order: neg before pos). "unseen words, bad": 3 tokens, unseen -> [UNK] (1).
    test = ds.splits["test"]
    np.testing.assert_array_equal(test["y"], [0, 1])
    np.testing.assert_array_equal(test["x"][0], [1, 1, ids["bad"]])
    np.testing.assert_array_equal(test["x"][1], [ids["great"], ids.get("acting", unk), 0])  # right-padded
    np.testing.assert_array_equal(test["lengths"], [3, 2])
    # Validation: one review of each class, held out of train.
    assert sorted(ds.splits["val"]["y"].tolist()) == [0, 1] and sorted(ds.splits["train"]["y"].tolist()) == [0, 0, 1, 1]
    assert ds.meta["input"] == "tokens" and ds.meta["vocab_size"] == 8


def test_imdb_pad_keeps_the_end_or_the_start():
    seqs = [np.array([1, 2, 3, 4, 5]), np.array([7])]
    x, lengths = imdb.pad(seqs, 3, "pre")
    np.testing.assert_array_equal(x, [[3, 4, 5], [7, 0, 0]])
    np.testing.assert_array_equal(lengths, [3, 1])
    x, _ = imdb.pad(seqs, 3, "post")
    np.testing.assert_array_equal(x, [[1, 2, 3], [7, 0, 0]])


def test_imdb_archive_with_other_content_is_rejected(tmp_path):
    archive = make_tar(tmp_path / "fake.tar.gz", REVIEWS)
    with pytest.raises(DownloadError, match=f"content digest mismatch: expected {imdb.CONTENT_DIGEST}"):
        imdb.check_content(archive)


def test_prepare_without_download_says_what_to_run(make_cfg):
    with pytest.raises(data.DataError, match=r"python -m pipeline.download data=mnist"):
        prepare.run(make_cfg("data=mnist", top="prepare"))


# --- The real datasets, from the mirror ----------------------------------------------------------------------
@pytest.fixture
def real(make_cfg, monkeypatch):
    monkeypatch.setenv("RNNLAB_DATA_MIRROR", str(mirror_path()))

    def run(name, *overrides):
        cfg = make_cfg(f"data={name}", *overrides, top="download")
        download.run(cfg)
        download.run(cfg)  # a second run keeps the verified files
        return cfg, prepare.run(cfg)

    return run


@needs_mirror
def test_real_ptb(real, tmp_path):
    cfg, stats = real("ptb")
    assert [stats[s]["tokens"] for s in ("train", "val", "test")] == [929_589, 73_760, 82_430]
    assert stats["vocab_size"] == 10_000
    ds = data.load(cfg.paths.data, "ptb")
    words = ds.vocab
    assert words[ds.splits["train"]["ids"][-1]] == "<eos>"
    first = " ".join(words[i] for i in ds.splits["test"]["ids"][:5])
    assert first == "no it was n't black"  # ptb.test.txt begins " no it was n't black monday"


@needs_mirror
def test_real_ptb_from_the_canonical_archive_layout(tmp_path, make_cfg, monkeypatch):
    """A mirror that has only simple-examples.tgz (as the canonical host serves it) works too."""
    mirror = tmp_path / "m"
    (mirror / "ptb").mkdir(parents=True)
    with tarfile.open(mirror / "ptb" / "simple-examples.tgz", "w:gz") as tar:
        for name, _ in ptb.FILES.values():
            tar.add(mirror_path() / "ptb" / name, arcname=f"./simple-examples/data/{name}")
    out = tmp_path / "raw"
    ptb.download(out, str(mirror), timeout=5)
    assert sorted(p.name for p in out.iterdir()) == ["ptb.test.txt", "ptb.train.txt", "ptb.valid.txt"]


@needs_mirror
def test_real_mnist(real):
    cfg, stats = real("mnist")
    raw = data.raw_dir(cfg.paths.data, cfg.data.source)
    labels = mnist.read_idx(raw / "train-labels-idx1-ubyte.gz")
    assert labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert np.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert mnist.read_idx(raw / "t10k-labels-idx1-ubyte.gz")[:5].tolist() == [7, 2, 1, 0, 4]
    assert (stats["train"]["n"], stats["val"]["n"], stats["test"]["n"]) == (55_000, 5_000, 10_000)
    ds = data.load(cfg.paths.data, "mnist")
    x = ds.splits["train"]["x"]
    assert x.shape == (55_000, 28, 28) and x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
    assert ds.meta["steps"] == 28 and ds.meta["features"] == 28


@needs_mirror
def test_real_imdb(real, tmp_path):
    cfg, stats = real("imdb")
    assert (stats["train"]["n"], stats["val"]["n"], stats["test"]["n"]) == (22_500, 2_500, 25_000)
    assert stats["train"]["positive_fraction"] == stats["val"]["positive_fraction"] == 0.5
    assert stats["test"]["positive_fraction"] == 0.5 and stats["vocab_size"] == 10_000
    ds = data.load(cfg.paths.data, "imdb")
    x = ds.splits["train"]["x"]
    assert x.shape == (22_500, 80) and x.max() < 10_000
    assert json.loads((data.prepared_dir(cfg.paths.data, "imdb") / "stats.json").read_text()) == stats
    # A damaged raw archive is detected and replaced on the next download.
    archive = data.raw_dir(cfg.paths.data, cfg.data.source) / imdb.RAW_NAME
    archive.write_bytes(archive.read_bytes()[:1000])
    download.run(cfg)
    imdb.check_content(archive)


@needs_mirror
def test_corrupt_mirror_file_is_reported_and_leaves_nothing(tmp_path, make_cfg, monkeypatch):
    mirror = tmp_path / "m"
    (mirror / "mnist").mkdir(parents=True)
    for name in mnist.FILES:  # plain copies: the shared mirror's read-only modes stay behind
        shutil.copyfile(mirror_path() / "mnist" / name, mirror / "mnist" / name)
    victim = mirror / "mnist" / "t10k-labels-idx1-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:-10])  # truncated copy
    # The sources are explicit: this mirror, then hosts that refuse at once (online or not).
    monkeypatch.setattr(mnist, "URL_BASES", (UNREACHABLE + "/mnist/",))
    cfg = make_cfg("data=mnist", f"download.mirror={mirror}", "download.timeout=2", top="download")
    with pytest.raises(DownloadError, match=r"t10k-labels-idx1-ubyte.gz.*expected sha256 f7ae60f9") as err:
        download.run(cfg)
    assert f"{UNREACHABLE}/mnist/t10k-labels-idx1-ubyte.gz" in str(err.value)
    raw = data.raw_dir(cfg.paths.data, cfg.data.source)
    assert not (raw / victim.name).exists()
    assert not [p for p in raw.iterdir() if p.name.startswith(".")]  # no temporary leftovers


# --- Raw files that fail verification: never left in place, never built from ----------------------------------
def test_a_corrupt_ptb_file_is_deleted_when_no_source_verifies(tmp_path, make_cfg, monkeypatch, caplog):
    mirror = tmp_path / "m"
    (mirror / "ptb").mkdir(parents=True)
    for name, _ in ptb.FILES.values():
        (mirror / "ptb" / name).write_text("a corrupt mirror copy\n")
    monkeypatch.setattr(ptb, "ARCHIVE_URL", f"{UNREACHABLE}/simple-examples.tgz")
    cfg = make_cfg("data=ptb", f"download.mirror={mirror}", "download.timeout=2", top="download")
    raw = data.raw_dir(cfg.paths.data, cfg.data.source)
    raw.mkdir(parents=True)
    (raw / "ptb.train.txt").write_text("a corrupt local copy\n")
    with pytest.raises(DownloadError) as err:
        download.run(cfg)
    message = str(err.value)
    assert f"{mirror}/ptb/ptb.train.txt: checksum mismatch: expected sha256 {ptb.FILES['train'][1]}" in message
    assert f"{UNREACHABLE}/simple-examples.tgz" in message
    assert sorted(p.name for p in raw.iterdir()) == []  # the bad file is gone: prepare cannot build from it
    expected, actual = ptb.FILES["train"][1], sha(b"a corrupt local copy\n")
    assert f"{raw / 'ptb.train.txt'} fails verification (sha256 {actual}, expected {expected})" in caplog.text


def test_a_corrupt_mnist_file_is_deleted_when_no_source_verifies(tmp_path, make_cfg, monkeypatch):
    name = "train-images-idx3-ubyte.gz"
    mirror = tmp_path / "m"
    (mirror / "mnist").mkdir(parents=True)
    write_idx(mirror / "mnist" / name, 2051, (1, 2, 2), bytes(4))
    monkeypatch.setattr(mnist, "URL_BASES", (f"{UNREACHABLE}/mnist/",))
    cfg = make_cfg("data=mnist", f"download.mirror={mirror}", "download.timeout=2", top="download")
    raw = data.raw_dir(cfg.paths.data, cfg.data.source)
    raw.mkdir(parents=True)
    write_idx(raw / name, 2051, (1, 2, 2), bytes([1, 2, 3, 4]))
    with pytest.raises(DownloadError, match=rf"{name}: checksum mismatch: expected sha256 {mnist.FILES[name]}"):
        download.run(cfg)
    assert sorted(p.name for p in raw.iterdir()) == []


TINY_PTB = "a b c\nb c\n"


def write_tiny_ptb(raw):
    raw.mkdir(parents=True)
    for name, _ in ptb.FILES.values():
        (raw / name).write_text(TINY_PTB)


def test_prepare_refuses_an_unverified_ptb_file_and_writes_nothing(make_cfg):
    cfg = make_cfg("data=ptb", "data.vocab_size=5", top="prepare")  # small enough that the tiny files would build
    raw = data.raw_dir(cfg.paths.data, cfg.data.source)
    write_tiny_ptb(raw)
    with pytest.raises(data.DataError) as err:
        prepare.run(cfg)
    assert str(err.value) == (
        f"raw file {raw / 'ptb.train.txt'} is not verified: expected sha256 {ptb.FILES['train'][1]}, "
        f"got {sha(TINY_PTB.encode())}. Fetch it again: `python -m pipeline.download data=ptb` "
        "(or `dvc repro download_ptb`)."
    )
    assert not data.prepared_dir(cfg.paths.data, "ptb").exists()


def unverified_mnist(name: str) -> str:
    return rf"raw file \S*/{name} is not verified: expected sha256 {mnist.FILES[name]}, got [0-9a-f]{{64}}\. Fetch"


def test_prepare_refuses_an_unverified_mnist_file(make_cfg):
    cfg = make_cfg("data=mnist", "data.val_size=1", top="prepare")
    raw = data.raw_dir(cfg.paths.data, cfg.data.source)
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", 2051, (2, 2, 2), bytes(8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", 2049, (2,), bytes([0, 1]))
    name = "train-images-idx3-ubyte.gz"
    with pytest.raises(data.DataError, match=unverified_mnist(name)):
        prepare.run(cfg)
    assert not data.prepared_dir(cfg.paths.data, "mnist").exists()


@needs_mirror
def test_prepare_refuses_one_hand_edited_mnist_label(make_cfg):
    """The real files with one test label changed: a valid IDX file that would build silently, so only the
    checksum can tell."""
    cfg = make_cfg("data=mnist", top="prepare")
    raw = data.raw_dir(cfg.paths.data, cfg.data.source)
    raw.mkdir(parents=True)
    for name in mnist.FILES:
        shutil.copyfile(mirror_path() / "mnist" / name, raw / name)
    name = "t10k-labels-idx1-ubyte.gz"
    labels = mnist.read_idx(raw / name).copy()
    labels[0] = (labels[0] + 1) % 10
    write_idx(raw / name, 2049, labels.shape, labels.tobytes())
    with pytest.raises(data.DataError, match=unverified_mnist(name)):
        prepare.run(cfg)


def test_imdb_records_its_content_check_and_refuses_a_changed_archive(tmp_path, make_cfg, monkeypatch):
    """A mirror repack passes the content check once; the recorded sha256 then verifies it cheaply. A changed
    archive is refused by prepare, and deleted by the next download when no source verifies."""
    mirror = tmp_path / "m"
    (mirror / "imdb").mkdir(parents=True)
    repack = make_tar(mirror / "imdb" / imdb.REPACK, REVIEWS)
    monkeypatch.setattr(imdb, "CONTENT_DIGEST", imdb.content_digest(repack))  # the tiny archive is the truth
    monkeypatch.setattr(imdb, "URL", f"{UNREACHABLE}/aclImdb_v1.tar.gz")
    cfg = make_cfg("data=imdb", f"download.mirror={mirror}", "download.timeout=2", top="download")
    raw = data.raw_dir(cfg.paths.data, cfg.data.source)
    download.run(cfg)
    record = raw / imdb.RECORD_NAME
    assert record.read_text() == f"{sha(repack.read_bytes())}  reviews.tar.gz\n"
    assert sorted(p.name for p in raw.iterdir()) == [imdb.RECORD_NAME, imdb.RAW_NAME]

    content_digest = imdb.content_digest
    monkeypatch.setattr(imdb, "content_digest", lambda path: pytest.fail("the cheap sha256 check should do"))
    imdb.verify(raw)
    download.run(cfg)  # present and verified by the record: same bytes, same record (a DVC no-op)
    assert record.read_text() == f"{sha(repack.read_bytes())}  reviews.tar.gz\n"
    monkeypatch.setattr(imdb, "content_digest", content_digest)

    changed = make_tar(tmp_path / "changed.tar.gz", {**REVIEWS, "aclImdb/test/neg/0_3.txt": b"edited"})
    (raw / imdb.RAW_NAME).write_bytes(changed.read_bytes())
    with pytest.raises(data.DataError) as err:
        prepare.run(cfg)
    message = str(err.value)
    assert f"raw file {raw / imdb.RAW_NAME} is not verified" in message
    assert f"got {sha(changed.read_bytes())}" in message
    assert f"content digest mismatch: expected {imdb.CONTENT_DIGEST}" in message
    assert "python -m pipeline.download data=imdb" in message

    shutil.copy(changed, repack)  # the mirror is now corrupt too
    with pytest.raises(DownloadError, match=f"{imdb.REPACK}: content digest mismatch"):
        download.run(cfg)
    assert sorted(p.name for p in raw.iterdir()) == []  # neither the bad archive nor its stale record is left


@pytest.mark.integration  # a real process
def test_prepare_command_exits_1_with_one_error_line(tmp_path):
    write_tiny_ptb(tmp_path / "data" / "raw" / "ptb")
    env = {k: v for k, v in os.environ.items() if k not in ("RNNLAB_ROOT", "HYDRA_FULL_ERROR")}
    overrides = ["data=ptb", f"paths.root={tmp_path}", "data.vocab_size=5"]
    cmd = [sys.executable, "-m", "pipeline.prepare", *overrides]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "ptb.train.txt is not verified" in errors[0] and "pipeline.download" in errors[0]
    assert "Traceback" not in output
