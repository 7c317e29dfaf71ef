"""Safe-CLIP data: JSONL quadruplets, the ViSU-Text layout + COCO folder, collation."""

import json

import pytest
import torch
from PIL import Image

from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.safeclip import Quadruplet, QuadrupletCollator, QuadrupletDataset, load_dataset
from vlmsafe.testbed.safeclip import tiny_clip_backend


def png(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), color).save(path)
    return path


def test_jsonl_quadruplets_with_optional_images(tmp_path):
    png(tmp_path / "img" / "v0.png", (255, 0, 0))
    png(tmp_path / "img" / "g0.png", (0, 255, 0))
    (tmp_path / "d.jsonl").write_text(
        json.dumps(
            {
                "safe": "a red square",
                "unsafe": "a red square with blood",
                "safe_image": "img/v0.png",
                "unsafe_image": "img/g0.png",
            }
        )
        + "\n"
        + json.dumps({"safe": "a cat", "unsafe": "a dead cat"})
        + "\n"
    )
    ds = QuadrupletDataset.from_jsonl(tmp_path / "d.jsonl")
    assert len(ds) == 2 and ds.has_images
    assert ds[0].safe_image == tmp_path / "img" / "v0.png" and ds[1].safe_image is None
    assert load_dataset(tmp_path / "d.jsonl")[0].unsafe == "a red square with blood"
    # collation: pixels only for items that have the image, with their row index
    backend = tiny_clip_backend(0, hidden=32, layers=1, vision_layers=1)
    batch = QuadrupletCollator(backend)(ds.items)
    assert batch["safe_image_index"].tolist() == [0] and batch["safe_image_pixels"].shape == (1, 3, 32, 32)
    assert batch["safe_text"]["input_ids"].shape[0] == 2
    text_only = QuadrupletCollator(backend, use_images=False)(ds.items)
    assert text_only["safe_image_pixels"] is None and text_only["safe_image_index"].numel() == 0


def test_visu_layout_with_coco_folder(tmp_path):
    coco = tmp_path / "coco"
    png(coco / "train2017" / "000000000042.jpg", (10, 20, 30))
    png(coco / "val2017" / "000000000007.jpg", (30, 20, 10))
    records = {
        "1": {
            "incremental_id": 1,
            "safe": "a man riding a horse",
            "nsfw": "a man whipping a bleeding horse",
            "coco_id": 7,
            "tag": "violence",
            "prompt_id": 3,
        },
        "0": {
            "incremental_id": 0,
            "safe": "a kitchen",
            "nsfw": "a kitchen full of drugs",
            "coco_id": 42,
            "tag": "illegal activity",
            "prompt_id": 1,
        },
    }
    (tmp_path / "visu.json").write_text(json.dumps({"info": {"split": "train"}, "data": records}))
    ds = QuadrupletDataset.from_visu(tmp_path / "visu.json", coco)
    assert [q.safe for q in ds] == ["a kitchen", "a man riding a horse"]  # ordered by id
    assert ds[0].safe_image == coco / "train2017" / "000000000042.jpg"
    assert ds[1].safe_image == coco / "val2017" / "000000000007.jpg"
    assert ds[0].unsafe_image is None  # ViSU's unsafe images are not public
    assert [q.unsafe for q in QuadrupletDataset.from_visu(tmp_path / "visu.json", tags=["violence"])] == [
        "a man whipping a bleeding horse"
    ]
    # text-only: no COCO folder
    assert not QuadrupletDataset.from_visu(tmp_path / "visu.json").has_images
    # JSONL and list layouts read the same
    (tmp_path / "visu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    assert len(load_dataset(tmp_path / "visu.jsonl", coco_dir=str(coco))) == 2


def test_visu_missing_coco_image(tmp_path):
    (tmp_path / "coco").mkdir()
    (tmp_path / "v.json").write_text(json.dumps([{"safe": "a", "nsfw": "b", "coco_id": 5}]))
    with pytest.raises(FileFormatError, match=r"000000000005\.jpg"):
        QuadrupletDataset.from_visu(tmp_path / "v.json", tmp_path / "coco")
    ds = QuadrupletDataset.from_visu(tmp_path / "v.json", tmp_path / "coco", missing_images="skip")
    assert ds[0].safe_image is None
    with pytest.raises(FileFormatError, match="does not exist"):
        QuadrupletDataset.from_visu(tmp_path / "v.json", tmp_path / "nope")


def test_bad_files_raise_clear_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"safe": "x", "unsafe": "y"}\n{broken\n')
    with pytest.raises(FileFormatError, match=":2"):
        QuadrupletDataset.from_jsonl(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text('{"safe": "x"}\n')
    with pytest.raises(FileFormatError, match="'safe' and 'unsafe'"):
        QuadrupletDataset.from_jsonl(tmp_path / "b.jsonl")
    with pytest.raises(FileFormatError, match="does not exist"):
        load_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="non-empty"):
        QuadrupletDataset([Quadruplet("", "y")])


def test_split_is_deterministic_and_disjoint():
    ds = QuadrupletDataset(Quadruplet(f"s{i}", f"u{i}") for i in range(20))
    tr, va = ds.split(0.25, seed=3)
    _tr2, va2 = ds.split(0.25, seed=3)
    assert [q.safe for q in va] == [q.safe for q in va2] and len(va) == 5 and len(tr) == 15
    assert not {q.safe for q in tr} & {q.safe for q in va}


def test_preprocessed_tensor_images_skip_the_processor():
    from vlmsafe.safeclip.images import pixel_batch

    backend = tiny_clip_backend(0, hidden=32, layers=1, vision_layers=1)
    t = torch.rand(3, 32, 32)
    assert torch.equal(pixel_batch(backend, [t, t]), torch.stack([t, t]))
    with pytest.raises(InputError, match="mix"):
        pixel_batch(backend, [t, Image.new("RGB", (32, 32))])


def test_record_fields_are_checked_with_their_location(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"safe": "x", "unsafe": "y"}\n{"safe": "x", "unsafe": "y", "safe_image": 5}\n')
    with pytest.raises(FileFormatError, match=r"a\.jsonl:2: 'safe_image' must be an image path"):
        QuadrupletDataset.from_jsonl(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text('{"safe": "x", "unsafe": "y", "unsafe_image": "gone.png"}\n')
    with pytest.raises(FileFormatError,
                       match=r"b\.jsonl:1: unsafe_image .*gone\.png' does not exist; fix the path or `image_root`"):
        QuadrupletDataset.from_jsonl(tmp_path / "b.jsonl")
    (tmp_path / "coco").mkdir()
    (tmp_path / "v.json").write_text(json.dumps({"7": {"safe": "a", "nsfw": "b", "coco_id": "seven"}}))
    with pytest.raises(FileFormatError, match=r"v\.json:1: 'coco_id' must be a non-negative integer"):
        QuadrupletDataset.from_visu(tmp_path / "v.json", tmp_path / "coco")
    (tmp_path / "e.jsonl").write_text('{"safe": "", "unsafe": "y"}\n')
    with pytest.raises(FileFormatError, match=r"e\.jsonl:1: .*non-empty 'safe' and 'unsafe'"):
        QuadrupletDataset.from_jsonl(tmp_path / "e.jsonl")


def test_truncated_and_non_image_files_are_clear_errors(tmp_path):
    png(tmp_path / "ok.png", (1, 2, 3))
    full = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    (tmp_path / "text.png").write_text("not an image")
    from vlmsafe.safeclip.images import load_image

    for name in ("cut.png", "text.png"):
        ds = QuadrupletDataset([Quadruplet("a", "b", tmp_path / "ok.png"), Quadruplet("c", "d", tmp_path / name)])
        with pytest.raises(FileFormatError, match=f"item 1 \\(safe_image\\): .*{name}' is not a readable image"):
            ds.verify_images()
        with pytest.raises(FileFormatError, match="is not a readable image"):
            load_image(tmp_path / name)


def test_safe_only_batch_is_the_safe_half_and_loads_no_unsafe_image(tmp_path):
    # what the frozen reference reads; the unsafe captions (longer here: they set the pair's padding) and images
    # are neither tokenized nor loaded
    items = [
        Quadruplet("a red square", "a red square covered in blood and gore", png(tmp_path / "v0.png", (255, 0, 0)),
                   png(tmp_path / "g0.png", (0, 255, 0))),
        Quadruplet("a cat", "a dead cat", None, png(tmp_path / "g1.png", (0, 0, 255))),
        Quadruplet("a blue circle on sand", "a blue circle on sand with blood", png(tmp_path / "v2.png", (0, 0, 9))),
    ]
    collator = QuadrupletCollator(tiny_clip_backend(0, hidden=32, layers=1, vision_layers=1), padded_safe_text=True)
    full, safe = collator(items), collator(items, safe_only=True)
    assert set(safe) == {"size", "safe_text", "safe_text_padded", "safe_image_index", "safe_image_pixels"}
    assert int(safe["size"]) == 3 and torch.equal(safe["safe_image_index"], full["safe_image_index"])
    assert torch.equal(safe["safe_image_pixels"], full["safe_image_pixels"])
    for key in ("safe_text", "safe_text_padded"):
        assert set(safe[key]) == set(full[key]) and all(torch.equal(safe[key][k], full[key][k]) for k in full[key])
    (tmp_path / "g0.png").unlink()  # an unsafe image the reference never reads
    with pytest.raises(FileFormatError):
        collator(items)
    assert torch.equal(collator(items, safe_only=True)["safe_image_pixels"], full["safe_image_pixels"])
