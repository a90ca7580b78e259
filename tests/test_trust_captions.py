"""Captioned folders, the latent cache and prompt files taken as untrusted input (issue #23): crafted metadata lines,
decompression bombs, a tampered cache (verified whole, then rebuilt or refused), prompt embeddings in bounded
memory with the same numbers, a cache shared by concurrent runs under its lock, a killed build's temporary
cleaned, and a full disk while the shards are written."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_refused, cli, ok
from o2mcli.data.captions import read_captions
from o2mcli.errors import O2MError
from sd_tiny import WORDS, save_captioned, save_tiny_sd, student_config

pytest.importorskip("transformers")

FAST = ["--steps", "2", "-b", "4", "--device", "cpu", "--log-every", "1"]
ENV = {**os.environ, "O2M_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
CACHE = "caps.latents-16"  # the default cache of --data caps beside the run (tiny SD: 8x8 latents, VAE factor 2)


@pytest.fixture(scope="module")
def sd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sd")
    save_tiny_sd(root / "sd")
    save_captioned(root / "caps", n=8)
    (root / "student.json").write_text(json.dumps(student_config()))
    return root


@pytest.fixture
def sd_tmp(sd_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("sd", "student.json"):
        (tmp_path / name).symlink_to(sd_root / name)
    # a copy, not a link: the cache's default name comes from the folder's resolved name, and tests edit it
    (tmp_path / "caps").mkdir()
    for p in (sd_root / "caps").iterdir():
        (tmp_path / "caps" / p.name).write_bytes(p.read_bytes())
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def parts(sd_root: Path):
    from o2mcli.models.families.stable_diffusion import load_sd_parts

    return load_sd_parts(sd_root / "sd", unet=False)


def _distill(*extra: str, out: str = "st") -> list[str]:
    return ["distill", "--student-config", "student.json", "--teacher", "sd", "--data", "caps", "-k", "1", *FAST,
            *extra, "-o", out]


def _refused_mid_run(result, *words: str) -> None:
    """Exit 2, the run's log lines and then one ``error: ...`` line naming ``words``, no traceback (a refusal that
    comes once the latent cache is being built, after the line that announces it)."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and not any(x.startswith("error: ") for x in lines[:-1]), result.stderr
    assert "Traceback" not in result.output
    assert all(w in lines[-1] for w in words), lines[-1]


def _bomb_png(path: Path, w: int = 100_000, h: int = 100_000) -> Path:
    """A small PNG whose header claims ``w`` x ``h`` pixels (IHDR rewritten with a valid CRC)."""
    Image.new("RGB", (8, 8)).save(path)
    raw = bytearray(path.read_bytes())
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4:ihdr + 12] = struct.pack(">II", w, h)
    raw[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr:ihdr + 17])) & 0xFFFFFFFF)
    path.write_bytes(bytes(raw))
    return path


# 1. metadata.jsonl: every line parsed bounded, every value checked -------------------------------------------------

def _meta(tmp_path: Path, *lines: str) -> Path:
    d = tmp_path / "meta"
    d.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "a.png")
    (d / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    return d


DEEP = "[" * 30_000 + "]" * 30_000


@pytest.mark.parametrize("line, words", [
    (DEEP, ["not JSON", "nested"]),  # was: RecursionError
    ('{"file_name": "a.png", "text": "x", "extra": ' + DEEP + "}", ["not JSON", "nested"]),
    (json.dumps({"file_name": "a\x00.png", "text": "x"}), ["file_name", "control character"]),  # was: ValueError
    (json.dumps({"file_name": "a\x01.png", "text": "x"}), ["file_name", "control character"]),
    (json.dumps({"file_name": "a.png\n", "text": "x"}), ["file_name", "control character"]),
    (json.dumps({"file_name": "a\x85.png", "text": "x"}), ["file_name", "control character"]),
    ('{"file_name": "a\\ud800.png", "text": "x"}', ["file_name", "lone surrogate"]),  # was: UnicodeEncodeError
    ('{"file_name": "a.png", "text": "x\\udc00"}', ["text", "lone surrogate"]),  # was: accepted, then a crash
    (json.dumps({"file_name": "a.png", "text": "a\x00cat"}), ["text", "control character"]),
    (json.dumps({"file_name": "a.png", "text": "a\x1bcat"}), ["text", "control character"]),
    (json.dumps({"file_name": 5, "text": "x"}), ["file_name", "is int, not a string"]),
    (json.dumps({"file_name": ["a.png"], "text": "x"}), ["file_name", "is list"]),
    (json.dumps({"file_name": "a.png", "text": None}), ["text", "is NoneType"]),
    (json.dumps({"file_name": "a.png", "text": {"en": "x"}}), ["text", "is dict"]),
    (json.dumps({"file_name": "x" * 300 + ".png", "text": "x"}), ["cannot be read"]),  # was: OSError (too long)
    (json.dumps({"file_name": "a.png", "text": "x"})[:-1] + ", " + "1" * 70_000 + "}", ["line of more than"]),
])
def test_a_crafted_metadata_line_is_refused_with_file_and_line(tmp_path: Path, line: str, words: list) -> None:
    d = _meta(tmp_path, json.dumps({"file_name": "a.png", "text": "fine"}), line)
    with pytest.raises(O2MError) as e:
        read_captions(d)
    msg = str(e.value)
    assert f"{d / 'metadata.jsonl'}:2: " in msg and "\n" not in msg, msg
    assert all(w in msg for w in words), msg


def test_clean_captions_keep_their_whitespace_and_a_bom_is_skipped(tmp_path: Path) -> None:
    d = _meta(tmp_path, "\ufeff" + json.dumps({"file_name": "a.png", "text": "a red\tcat\non two lines"}))
    assert [c.text for c in read_captions(d)] == ["a red\tcat\non two lines"]


def test_a_metadata_file_without_newlines_is_not_read_whole(tmp_path: Path) -> None:
    d = _meta(tmp_path)
    (d / "metadata.jsonl").write_bytes(b"x" * (8 << 20))  # 8 MiB, one line
    with pytest.raises(O2MError, match=r"metadata.jsonl:1: line of more than 65,536 bytes"):
        read_captions(d)


def test_crafted_lines_are_refused_through_the_cli(sd_tmp: Path) -> None:
    meta = Path("caps/metadata.jsonl")
    good = meta.read_text()
    for line, word in ((DEEP, "nested"), (json.dumps({"file_name": "000\x00.png", "text": "x"}), "control character")):
        meta.write_text(good + line + "\n")
        assert_refused(cli(*_distill()), "metadata.jsonl:9", word)
    assert not Path("st").exists() and not Path(CACHE).exists()


# 2. One guarded image reader for --data folders and the latent cache ---------------------------------------------

def test_the_latent_cache_reader_refuses_a_decompression_bomb(tmp_path: Path) -> None:
    from o2mcli.data import folder
    from o2mcli.data.latent_cache import load_rgb

    bomb = _bomb_png(tmp_path / "bomb.png")
    with pytest.raises(O2MError, match="decompression bomb"):
        load_rgb(bomb, 16)  # was: PIL's DecompressionBombError, an internal error
    # Below PIL's own limits but above o2m's: refused before decoding too, by the same reader.
    mid = _bomb_png(tmp_path / "mid.png", 9000, 9000)
    with pytest.raises(O2MError, match="9000x9000 pixels"):
        load_rgb(mid, 16)
    with pytest.raises(O2MError, match="9000x9000 pixels"):
        folder._read([mid])
    # A thin strip is a bomb once its short side is scaled up to the resolution.
    Image.new("RGB", (1, 70_000)).save(tmp_path / "strip.png")
    with pytest.raises(O2MError, match="would be resized to 64x4480000"):
        load_rgb(tmp_path / "strip.png", 64)
    # Unreadable files, each one line naming the file.
    (tmp_path / "text.png").write_text("not an image")
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
    for name in ("text.png", "cut.png", "missing.png"):
        with pytest.raises(O2MError, match=f"{name}: unreadable image"):
            load_rgb(tmp_path / name, 16)
    assert load_rgb(good, 16).shape == (3, 16, 16)


def test_16_bit_grayscale_is_read_as_rgb(tmp_path: Path) -> None:
    from o2mcli.data.latent_cache import load_rgb

    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(tmp_path / "g16.png")
    x = load_rgb(tmp_path / "g16.png", 8)
    assert x.shape == (3, 8, 8) and torch.equal(x[0], x[1])


def test_a_bomb_in_a_captioned_folder_is_refused_by_distill(sd_tmp: Path) -> None:
    _bomb_png(Path("caps/003.png"))
    _refused_mid_run(cli(*_distill()), "003.png", "decompression bomb")
    assert not Path("st").exists() and not Path(CACHE).exists()
    assert not [p for p in sd_tmp.iterdir() if p.name.endswith(".tmp-o2m")]


# 3. A tampered latent cache: verified whole, then rebuilt (o2m's own) or refused ------------------------------------

def _items(tmp_path: Path, n: int = 5):
    return read_captions(save_captioned(tmp_path / "data", n=n))


class Encoders:
    """Stand-ins for the VAE and text encoder (16px images -> (4, 8, 8); captions -> (77, 32)), counting calls."""

    def __init__(self) -> None:
        self.images = self.texts = 0

    def image(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        pooled = torch.nn.functional.avg_pool2d(x, 2)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)

    def text(self, texts: list[str]) -> torch.Tensor:
        self.texts += len(texts)
        return torch.stack([torch.arange(77 * 32, dtype=torch.float32).reshape(77, 32) * len(t) for t in texts])


SHAPES = ((4, 8, 8), (77, 32))
RECORD = {"vae": "v" * 64, "text_encoder": "t" * 64, "tokenizer": "k" * 64, "latent": "posterior mean"}


def _cached(out: Path, items, enc: Encoders, **kw):
    from o2mcli.data.latent_cache import cached

    return cached(out, items, enc.image, enc.text, RECORD, 16, SHAPES, **{"shard_size": 2, **kw})


def _rewrite_shard(cache: Path, i: int, edit) -> None:
    """Rewrite shard ``i`` through ``edit(tensors) -> tensors`` and record its new sha256 in the index, as a
    tamperer who knows the format would: only the structural checks can catch it."""
    from safetensors.torch import load_file, save_file

    from o2mcli.fsutil import sha256_file

    name = f"shard-{i:05d}.safetensors"
    save_file(edit(load_file(str(cache / name))), str(cache / name))
    index = json.loads((cache / "o2m_latent_cache.json").read_text())
    index["shards"][i]["sha256"] = sha256_file(cache / name)
    (cache / "o2m_latent_cache.json").write_text(json.dumps(index))


def _edit_index(cache: Path, edit) -> None:
    index = json.loads((cache / "o2m_latent_cache.json").read_text())
    edit(index)
    (cache / "o2m_latent_cache.json").write_text(json.dumps(index))


def _drop(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


def _nan(t):
    t["latents"][0, 0, 0, 0] = float("nan")
    return t


def _stale_width(cache: Path) -> None:  # shards and index agree on another text width: stale for this run
    _rewrite_shard(cache, 0, lambda t: {**t, "text": t["text"][..., :16].contiguous()})
    _edit_index(cache, lambda ix: ix.update(text_shape=[77, 16]))


TAMPERED = {
    "index without sha256": (lambda c: _edit_index(c, lambda ix: ix["shards"][0].pop("sha256")), "shard 0 is not"),
    "index sha256 not hex": (lambda c: _edit_index(c, lambda ix: ix["shards"][1].update(sha256="zz")), "shard 1"),
    "shard without latents": (lambda c: _rewrite_shard(c, 0, _drop("latents")), "not exactly the tensors"),
    "shard without text": (lambda c: _rewrite_shard(c, 1, _drop("text")), "not exactly the tensors"),
    "an extra tensor": (lambda c: _rewrite_shard(c, 1, lambda t: {**t, "x": torch.zeros(1)}), "not exactly"),
    "fewer latents than images": (lambda c: _rewrite_shard(c, 0, lambda t: {**t, "latents": t["latents"][:1]}),
                                  "latents has shape [1, 4, 8, 8]"),
    "text width": (lambda c: _rewrite_shard(c, 2, lambda t: {**t, "text": t["text"][..., :16].contiguous()}),
                   "text has shape [1, 77, 16]"),
    "latent channels": (lambda c: _rewrite_shard(c, 0, lambda t: {**t, "latents": t["latents"][:, :3].contiguous()}),
                        "latents has shape [2, 3, 8, 8]"),
    "float16 latents": (lambda c: _rewrite_shard(c, 0, lambda t: {**t, "latents": t["latents"].half()}), "F16"),
    "integer text": (lambda c: _rewrite_shard(c, 0, lambda t: {**t, "text": t["text"].long()}), "I64"),
    "n mismatch": (lambda c: _edit_index(c, lambda ix: ix.update(n=6)), "number of images"),
    "shards that do not sum to n": (lambda c: _edit_index(c, lambda ix: ix["shards"][2].update(n=2)),
                                    "hold 6 rows, but n is 5"),
    "a missing shard": (lambda c: (c / "shard-00001.safetensors").unlink(), "missing or changed"),
    "a changed shard": (lambda c: (c / "shard-00001.safetensors").write_bytes(b"\0" * 64), "missing or changed"),
    "a shard listed twice": (lambda c: _edit_index(c, lambda ix: ix["shards"].append(ix["shards"][0])), "twice"),
    "index not JSON": (lambda c: (c / "o2m_latent_cache.json").write_text("{"), "unreadable JSON"),
    "index nested deep": (lambda c: (c / "o2m_latent_cache.json").write_text("[" * 100_000), "nested"),
    "index of another format": (lambda c: _edit_index(c, lambda ix: ix.update(format="x")), "not an o2m"),
    "index without shapes": (lambda c: _edit_index(c, lambda ix: ix.pop("latent_shape")), "latent shape"),
    "non-finite latents": (lambda c: _rewrite_shard(c, 0, _nan), "non-finite"),
    "stale text width": (_stale_width, "text-embedding shape"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_cache_is_verified_whole_and_rebuilt(tmp_path: Path, capsys: pytest.CaptureFixture, case: str
                                                        ) -> None:
    from o2mcli.data.latent_cache import load_cache

    items, enc = _items(tmp_path), Encoders()
    cache = tmp_path / "cache"
    _, want_latents, want_text = _cached(cache, items, enc)
    assert enc.images == 5 and len(list(cache.glob("shard-*"))) == 3
    tamper, words = TAMPERED[case]
    tamper(cache)
    capsys.readouterr()
    if case != "stale text width":  # consistent in itself; stale only for what this run needs
        with pytest.raises(O2MError):
            load_cache(cache)
    got = _cached(cache, items, enc)  # was: a KeyError, a shape error deep in training, or a silent wrong cache
    err = capsys.readouterr().err
    assert enc.images == 10 and enc.texts == 10, "rebuilt"
    assert "note: " in err and "rebuilding the latent cache" in err and words in err, err
    assert torch.equal(got[1], want_latents) and torch.equal(got[2], want_text)
    lat, txt = load_cache(cache)
    assert torch.equal(lat, want_latents) and torch.equal(txt, want_text)
    _cached(cache, items, enc)
    assert enc.images == 10, "then reused"


def test_what_is_not_o2ms_cache_alone_is_refused_never_replaced(tmp_path: Path) -> None:
    items, enc = _items(tmp_path), Encoders()
    cache = tmp_path / "cache"
    _cached(cache, items, enc)
    _rewrite_shard(cache, 0, _drop("text"))
    (cache / "notes.txt").write_text("mine")
    with pytest.raises(O2MError) as e:
        _cached(cache, items, enc)
    assert "not exactly the tensors" in str(e.value) and "will not replace" in str(e.value)
    assert "notes.txt" in str(e.value) and (cache / "notes.txt").read_text() == "mine"
    # a link to a stale cache: the link and its target stay
    (cache / "notes.txt").unlink()
    link = tmp_path / "link"
    link.symlink_to(cache)
    with pytest.raises(O2MError, match="symbolic link"):
        _cached(link, items, enc)
    assert link.is_symlink() and (cache / "shard-00001.safetensors").is_file()
    # a folder of someone's files
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    with pytest.raises(O2MError, match="no o2m_latent_cache.json"):
        _cached(other, items, enc)
    assert (other / "x.txt").read_text() == "x" and enc.images == 5
    # an empty folder is a place to build in
    (tmp_path / "empty").mkdir()
    _cached(tmp_path / "empty", items, enc)
    assert (tmp_path / "empty" / "o2m_latent_cache.json").is_file()


def test_a_tampered_cache_through_distill_is_rebuilt_with_a_note(sd_tmp: Path) -> None:
    ok(*_distill(out="st"))
    _rewrite_shard(sd_tmp / CACHE, 0, _drop("text"))  # was: KeyError 'text' (an internal error)
    r = cli(*_distill(out="st2"))
    assert r.exit_code == 0, r.output
    assert "rebuilding the latent cache" in r.stderr and "not exactly the tensors latents and text" in r.stderr
    # A cache placed inside what the run reads is refused (even when it would be new).
    assert_refused(cli(*_distill("--latent-cache", "caps/cache", out="x")), "caps/cache", "lies inside", "reads")
    assert_refused(cli(*_distill("--latent-cache", "caps", out="x")), "caps", "latent cache is")
    assert_refused(cli(*_distill("--latent-cache", "x/c", out="x")), "x/c", "lies inside")
    assert not Path("x").exists() and not Path("caps/cache").exists()


def test_a_cache_where_o2m_cannot_write_is_used_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from o2mcli.data import latent_cache

    items, enc = _items(tmp_path), Encoders()
    _cached(tmp_path / "cache", items, enc)

    def read_only(path, *a, **k):  # as _try_lock refuses where the lock file cannot be made
        raise O2MError(f"{path}: cannot write in {path.parent} (Read-only file system); nothing was done")

    monkeypatch.setattr(latent_cache, "wait_for_lock", read_only)
    _cached(tmp_path / "cache", items, enc)
    assert enc.images == 5  # a shared read-only copy: used, never rebuilt
    (tmp_path / "cache" / "shard-00000.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(O2MError, match="missing or changed.*cannot write beside"):
        _cached(tmp_path / "cache", items, enc)
    with pytest.raises(O2MError, match="Read-only file system"):
        _cached(tmp_path / "new", items, enc)


# 5. Prompt embeddings in bounded memory, with the same numbers -----------------------------------------------------

def _prompt_file(path: Path, n: int) -> Path:
    path.write_text("\n".join(f"a photo of {WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]} {i}"
                              for i in range(n)) + "\n")
    return path


ROW = 77 * 32 * 4  # bytes of one tiny-CLIP embedding


def test_a_long_prompt_list_is_embedded_in_chunks_with_the_eager_numbers(tmp_path: Path, parts,
                                                                         capsys: pytest.CaptureFixture) -> None:
    from o2mcli.data.prompts import read_prompts
    from o2mcli.data.text import CHUNK_ROWS, ChunkedTable, prompt_plan
    from o2mcli.models.families.stable_diffusion import encode_prompts

    prompts = read_prompts(_prompt_file(tmp_path / "many.txt", 1000))
    eager = encode_prompts(parts, list(prompts) + [""])  # what the whole table was
    budget = 3 * CHUNK_ROWS * ROW
    plans = [prompt_plan(parts, prompts, 0.1, {"pipeline": "p"}, budget=budget) for _ in range(2)]
    assert f"--prompts {tmp_path / 'many.txt'}" in capsys.readouterr().err
    g = torch.Generator().manual_seed(0)
    orders = [torch.randperm(1001, generator=g), torch.arange(1000, -1, -1)]
    for plan, order in zip(plans, orders):
        table = plan.table
        assert isinstance(table, ChunkedTable) and len(table) == 1001 and plan.n == 1000
        for idx in order.split(37):
            assert torch.equal(table[idx], eager[idx])  # bit-exact, whatever the order and the evictions
        assert torch.equal(plan.cond(torch.tensor([[1000, 3], [999, 0]])).tokens, eager[torch.tensor([[1000, 3], [999, 0]])])
        assert table.peak_rows <= 3 * CHUNK_ROWS, table.peak_rows  # never more than the budget's rows held
        assert table.numel() * 4 <= budget
    assert plans[0].table.made > 1001 // CHUNK_ROWS + 1  # chunks were dropped and made again, the same
    # Within the budget: one table, as before.
    whole = prompt_plan(parts, prompts, 0.1, {"pipeline": "p"}, budget=2000 * ROW).table
    assert isinstance(whole, torch.Tensor) and torch.equal(whole, eager)


def test_a_budget_below_one_chunk_is_refused_with_the_estimate(tmp_path: Path, parts,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from o2mcli.data.prompts import read_prompts
    from o2mcli.data.text import prompt_plan

    prompts = read_prompts(_prompt_file(tmp_path / "p.txt", 200))
    monkeypatch.setenv("O2M_TEXT_MEMORY", "100K")
    with pytest.raises(O2MError) as e:
        prompt_plan(parts, prompts, 0.1, {})
    msg = str(e.value)
    assert f"--prompts {tmp_path / 'p.txt'}" in msg and "616.0 KiB" in msg and "100.0 KiB" in msg, msg
    monkeypatch.setenv("O2M_TEXT_MEMORY", "lots")
    with pytest.raises(O2MError, match="O2M_TEXT_MEMORY='lots': not a byte count"):
        prompt_plan(parts, prompts, 0.1, {})


def test_dkdm_and_sample_with_a_small_budget_give_the_same_results(sd_tmp: Path, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    from safetensors.torch import load_file

    _prompt_file(Path("many.txt"), 300)
    dkdm = ["distill", "--student-config", "student.json", "--teacher", "sd", "--mode", "dkdm", "--prompts",
            "many.txt", "--rho", "0.02", "--init-steps", "2", "--steps", "3", "-b", "4", "--device", "cpu"]
    sample = ["sample", "sd", "--prompts", "many.txt", "-n", "70", "--steps", "2", "--device", "cpu", "--no-png",
              "-b", "35"]
    ok(*dkdm, "-o", "whole")
    ok(*sample, "-o", "s-whole")
    monkeypatch.setenv("O2M_TEXT_MEMORY", str(64 * ROW))  # one chunk held: of 5 (dkdm), of 2 (sample)
    r = cli(*dkdm, "-o", "chunked")
    assert r.exit_code == 0, r.output
    assert "text-memory budget" in r.stderr and "--prompts many.txt" in r.stderr
    r = cli(*sample, "-o", "s-chunked")
    assert r.exit_code == 0, r.output
    assert "text-memory budget" in r.stderr
    a, b = load_file("whole/student_0.safetensors"), load_file("chunked/student_0.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with np.load("s-whole/samples.npz") as x, np.load("s-chunked/samples.npz") as y:
        assert np.array_equal(x["images"], y["images"]) and np.array_equal(x["prompts"], y["prompts"])


def test_captions_beyond_the_budget_are_read_from_the_cache_in_chunks(sd_tmp: Path, parts,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from o2mcli.data.text import ChunkedTable, captioned_latents
    from o2mcli.models.families.stable_diffusion import aux_hashes, encode_prompts

    save_captioned(sd_tmp / "many", n=150)
    cond = {"pipeline": str(parts.root), "hashes": aux_hashes(parts.root)}
    args = (sd_tmp / "many", parts, 8, 0.1, cond, None, sd_tmp / "st")
    lat, whole = captioned_latents(*args)
    capsys.readouterr()
    lat2, lazy = captioned_latents(*args, budget=64 * ROW)
    assert "--data" in capsys.readouterr().err
    assert isinstance(whole.table, torch.Tensor) and isinstance(lazy.table, ChunkedTable)
    assert torch.equal(lat.images, lat2.images) and lat.sha256 == lat2.sha256
    for idx in torch.randperm(151, generator=torch.Generator().manual_seed(1)).split(20):
        assert torch.equal(lazy.table[idx], whole.table[idx])
    assert torch.equal(whole.table[150], encode_prompts(parts, [""])[0])
    assert lazy.table.peak_rows <= 64
    # The cache holds the VAE posterior's means (scaled), not draws from it.
    from o2mcli.data.latent_cache import load_rgb

    first = read_captions(sd_tmp / "many")[0].path
    with torch.no_grad():
        mean = parts.vae.encode(load_rgb(first, 16)[None] * 2 - 1).latent_dist.mean[0]
    assert torch.allclose(lat.images[0], mean * parts.vae.config.scaling_factor, atol=1e-6)


# 6, 7. Runs share the cache under its lock; a killed build's temporary is cleaned --------------------------------

_WRAPPER = """
import sys, time
import o2mcli.data.latent_cache as lc
slow = float(sys.argv[1])
real_load, real_build = lc.load_rgb, lc._build
def load(*a, **k):
    time.sleep(slow)
    return real_load(*a, **k)
def build(*a, **k):
    print("o2m-test: building the cache", file=sys.stderr, flush=True)
    return real_build(*a, **k)
lc.load_rgb, lc._build = load, build
from o2mcli.cli import app
app(sys.argv[2:], prog_name="o2m")
"""


def _start(cwd: Path, slow: float, args: list[str], err: Path) -> subprocess.Popen:
    (cwd / "wrapper.py").write_text(_WRAPPER)
    return subprocess.Popen([sys.executable, str(cwd / "wrapper.py"), str(slow), *args], cwd=cwd, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=open(err, "w"))


def _until(cond, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{what} never happened")
        time.sleep(0.02)


def test_two_distills_share_the_cache_the_second_waits_and_reuses_it(sd_tmp: Path) -> None:
    lock = sd_tmp / f".{CACHE}.o2m-lock"
    a = _start(sd_tmp, 0.3, _distill(out="st1"), sd_tmp / "a.err")
    _until(lambda: lock.exists() and lock.stat().st_size > 0, a, "the first run taking the cache's lock")
    os.kill(a.pid, signal.SIGSTOP)  # frozen while it builds: the second run meets it mid-build
    try:
        b = _start(sd_tmp, 0.0, _distill(out="st2"), sd_tmp / "b.err")
        _until(lambda: "waiting for the latent cache" in (sd_tmp / "b.err").read_text(), b, "the second run waiting")
    finally:
        os.kill(a.pid, signal.SIGCONT)
    assert a.wait(timeout=300) == 0, (sd_tmp / "a.err").read_text()
    assert b.wait(timeout=300) == 0, (sd_tmp / "b.err").read_text()  # was: "output already exists"
    a_err, b_err = (sd_tmp / "a.err").read_text(), (sd_tmp / "b.err").read_text()
    assert "o2m-test: building the cache" in a_err and "o2m-test: building the cache" not in b_err, b_err
    assert "note: waiting for the latent cache" in b_err and f"pid {a.pid}" in b_err
    assert (sd_tmp / "st1" / "manifest.json").is_file() and (sd_tmp / "st2" / "manifest.json").is_file()
    assert not lock.exists()
    assert not [p for p in sd_tmp.iterdir() if p.name.endswith(".tmp-o2m")]


def test_a_build_killed_midway_leaves_a_temporary_the_next_run_cleans_and_names(sd_tmp: Path) -> None:
    def temps() -> list[Path]:
        return [p for p in sd_tmp.iterdir() if p.name.startswith(f".{CACHE}.") and p.name.endswith(".tmp-o2m")]

    a = _start(sd_tmp, 0.3, _distill(out="st1"), sd_tmp / "a.err")
    _until(lambda: bool(temps()), a, "the cache's temporary appearing")
    a.send_signal(signal.SIGKILL)
    a.wait()
    left = temps()
    assert len(left) == 1 and not (sd_tmp / CACHE).exists()
    r = cli(*_distill(out="st"))
    assert r.exit_code == 0, r.output
    assert "note: removed 1 unfinished temporary output(s) of a killed run" in r.stderr and left[0].name in r.stderr
    assert not temps() and (sd_tmp / CACHE / "o2m_latent_cache.json").is_file()


# 8. A full disk while the shards are written ----------------------------------------------------------------------

def test_a_disk_that_fills_while_the_shards_are_written_is_refused_in_one_line(sd_tmp: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    _refused_mid_run(cli(*_distill()), "shard-00000.safetensors", "No space left on device", "nothing was written")
    assert not Path(CACHE).exists() and not Path("st").exists()
    assert not [p for p in sd_tmp.iterdir() if p.name.endswith(".tmp-o2m")]
