"""Real checkpoint layouts: original LLaVA with inv_freq buffers, .bin shards, hashing in the same read."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from fixtures.merge_llava_original import save_tensors, write_original_llava
from safetensors import safe_open

from vlmsafe.errors import FileFormatError
from vlmsafe.merge import Checkpoint, MergeConfig, is_buffer, merge_checkpoints
from vlmsafe.merge.plan import BUFFER_REASON

transformers = pytest.importorskip("transformers")


def _read_all(out) -> dict[str, torch.Tensor]:
    res = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            res.update({k: h.get_tensor(k) for k in list(h.keys())})
    return res


def _aligned(tmp_path, o, fmt: str, with_buffers: bool):
    """The text-only LLM the VLM was built from (vicuna's role): model.layers.*, same shapes, other values."""
    g = torch.Generator().manual_seed(5)
    lm = {k: (t.float() + 0.05 * torch.randn(t.shape, generator=g)).half() for k, t in o.tensors.items()
          if not k.startswith("model.mm_projector") and not is_buffer(k)}
    if with_buffers:  # Llama-2 .bin checkpoints saved by transformers < 4.31 carry the buffer too
        lm.update({k: t for k, t in o.tensors.items() if is_buffer(k)})
    path = tmp_path / f"aligned_{fmt}"
    save_tensors(path, lm, fmt, shards=2)
    return path, lm


@pytest.mark.parametrize(("fmt", "shards", "aligned_buffers"), [("safetensors", 2, False), ("bin", 2, True),
                                                                 ("bin", 1, False)])
def test_original_layout_with_inv_freq_merges_without_passthrough(tmp_path, fmt, shards, aligned_buffers):
    o = write_original_llava(tmp_path, version="1.5", fmt=fmt, shards=shards)
    aligned, lm = _aligned(tmp_path, o, "bin" if fmt == "safetensors" else "safetensors", aligned_buffers)
    threads = torch.get_num_threads()
    res = merge_checkpoints(MergeConfig(vlm=o.path, aligned=aligned, output=tmp_path / "out", weight=0.3),
                            progress=False)
    assert torch.get_num_threads() == threads  # the merge's one intra-op thread is given back
    got = _read_all(res.output)
    assert set(got) == set(o.tensors)  # same layout out, nothing dropped or renamed
    buffers = [k for k in o.tensors if is_buffer(k)]
    lm_names = [k for k in o.tensors if k in lm and not is_buffer(k)]
    assert len(buffers) == 2 and len(lm_names) == 2 + 9 * 2 + 1
    for k in lm_names:
        want = (0.7 * o.tensors[k].float() + 0.3 * lm[k].float()).half()
        assert got[k].dtype == torch.float16 and torch.allclose(got[k].float(), want.float(), atol=2e-3), k
        assert not torch.equal(got[k], o.tensors[k])
    for k in buffers + [k for k in o.tensors if k.startswith("model.mm_projector")]:
        assert torch.equal(got[k], o.tensors[k]), k  # projector and buffers untouched (inv_freq stays float32)
    t = res.recipe["tensors"]
    assert t["merged"] == len(lm_names) and t["passed_through"] == {} and sorted(t["buffers"]) == sorted(buffers)
    assert t["copied_by_reason"][BUFFER_REASON] == 2 and t["ignored_aligned"] == []
    assert (res.output / "config.json").is_file() and not list(res.output.glob("*.bin"))
    for role, path in (("vlm", o.path), ("aligned", aligned)):
        hashes = res.recipe["inputs"][role]["sha256"]
        files = [p for p in path.iterdir() if p.suffix in (".bin", ".safetensors")]
        assert files and all(hashes[p.name] == hashlib.sha256(p.read_bytes()).hexdigest() for p in files)


def test_bin_reader_equals_the_tensors_and_refuses_anything_else(tmp_path):
    a = torch.arange(24, dtype=torch.float16).reshape(4, 6)
    state = {"a": a, "row": a[1:3], "t": a.t(), "b": torch.ones(3, dtype=torch.bfloat16), "i": torch.tensor(7)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with Checkpoint(tmp_path) as ck:
        assert sorted(ck.keys()) == sorted(state)
        for k, v in state.items():
            assert torch.equal(ck.get(k), v) and ck.info(k).shape == tuple(v.shape), k
        assert torch.equal(ck.get_rows("t", 2, 5), a.t()[2:5])  # a strided view: read through mmap
        buf = torch.empty(64, dtype=torch.uint8)
        assert torch.equal(ck.get_rows("a", 1, 3, out=buf), a[1:3]) and buf.data_ptr() == ck.get_rows(
            "a", 1, 3, out=buf).untyped_storage().data_ptr()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "evil").mkdir()
    torch.save({"w": torch.ones(2), "x": Evil()}, tmp_path / "evil" / "pytorch_model.bin")
    with pytest.raises(FileFormatError, match="holds objects other than tensors; vlmsafe never unpickles code"):
        Checkpoint(tmp_path / "evil")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "nested").mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "nested" / "pytorch_model.bin")
    with pytest.raises(FileFormatError, match=r"not a flat state dict"):
        Checkpoint(tmp_path / "nested")
    (tmp_path / "legacy").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(FileFormatError, match=r"legacy torch\.save before 1\.6"):
        Checkpoint(tmp_path / "legacy")
    (tmp_path / "idx").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "idx" / "pytorch_model-00001-of-00002.bin")
    wm = {"w": "pytorch_model-00001-of-00002.bin", "v": "pytorch_model-00002-of-00002.bin"}
    (tmp_path / "idx" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(FileFormatError, match=r"pytorch_model-00002-of-00002\.bin, which is missing"):
        Checkpoint(tmp_path / "idx")


@pytest.mark.parametrize("pair", ["vlm_b", "llm"])
def test_inputs_are_read_once_and_hashed_in_the_same_read(tmp_path, monkeypatch, pair):
    """Hashing adds no second pass: inputs read in storage order are read once.

    A second VLM of the same layout (the mergekit-style pair) is read in its storage order too; an LLM
    sharded differently is read out of order in places, and only those gaps are read again.
    """
    import vlmsafe.merge.checkpoint as checkpoint

    o = write_original_llava(tmp_path, version="1.5", fmt="safetensors", shards=2)
    if pair == "vlm_b":
        aligned = tmp_path / "vlm_b"
        save_tensors(aligned, {k: (t + 1 if t.is_floating_point() else t) for k, t in o.tensors.items()},
                     "safetensors", shards=2)
    else:
        aligned, _ = _aligned(tmp_path, o, "safetensors", False)
    read: dict[str, int] = {}
    real_open = open

    class Counting:
        def __init__(self, f, name):
            self._f, self._name = f, name

        def readinto(self, b):
            n = self._f.readinto(b)
            read[self._name] = read.get(self._name, 0) + (n or 0)
            return n

        def read(self, *a):
            data = self._f.read(*a)
            read[self._name] = read.get(self._name, 0) + len(data)
            return data

        def __getattr__(self, k):
            return getattr(self._f, k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    import vlmsafe.reading

    for module in (checkpoint, vlmsafe.reading):  # the reader and the stand-alone sha256_file
        monkeypatch.setattr(module, "open", lambda p, *a, **k: Counting(real_open(p, *a, **k), os.fspath(p)),
                            raising=False)
    res = merge_checkpoints(MergeConfig(vlm=o.path, aligned=aligned, output=tmp_path / "out", weight=0.5),
                            progress=False)
    for role, path in (("vlm", o.path), ("aligned", aligned)):
        for p in path.glob("*.safetensors"):
            size = p.stat().st_size
            header = 8 + int.from_bytes(p.read_bytes()[:8], "little")  # parsed once more when opening
            once = role == "vlm" or pair == "vlm_b"
            assert read[os.fspath(p)] <= (size if once else 2 * size) + header, (p.name, read[os.fspath(p)], size)
            assert res.recipe["inputs"][role]["sha256"][p.name] == hashlib.sha256(p.read_bytes()).hexdigest()
