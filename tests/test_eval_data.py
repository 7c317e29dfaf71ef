"""vlmsafe JSONL format: loading, path resolution, validation errors, round trip."""

import json
from pathlib import Path

import pytest
from PIL import Image

from vlmsafe.errors import FileFormatError
from vlmsafe.eval import Item, load_items, save_items

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def test_load_items_fixture_resolves_images_and_defaults():
    items = load_items(FIXTURES / "items.jsonl")
    assert [it.id for it in items] == ["h1", "h2", "b1"]
    h1, h2, b1 = items
    assert Path(h1.image).is_absolute() and h1.image == str((FIXTURES / "images" / "red.png").resolve())
    assert h2.image is None and h2.load_image() is None
    assert (h1.category, h1.label, h1.reference) == ("weapons", "harmful", None)
    assert (b1.label, b1.reference, b1.meta) == ("benign", "red", {"source": "synthetic"})
    im = b1.load_image()
    assert im.mode == "RGB" and im.size == (8, 8) and im.getpixel((0, 0)) == (255, 0, 0)


def test_load_items_works_from_another_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    items = load_items(FIXTURES / "items.jsonl")
    assert items[0].load_image().size == (8, 8)


def test_defaults_for_optional_keys(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"id": 7, "prompt": "hello"}\n\n')
    (item,) = load_items(p)
    assert (item.id, item.image, item.category, item.label, item.reference) == ("7", None, "uncategorized", None, None)


@pytest.mark.parametrize(
    "lines, expected",
    [
        (['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "y"'], [":2:", "invalid JSON"]),
        (['{"id": "a"}'], [":1:", "'prompt'"]),
        (['{"id": "a", "prompt": "x", "label": "evil"}'], [":1:", "'label'", "evil"]),
        (['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'], [":2:", "duplicate id 'a'", ":1"]),
        (['{"id": "a", "prompt": "x", "image": "nope.png"}'], [":1:", "image", "nope.png", "does not exist"]),
        (['["a", "b"]'], [":1:", "JSON object"]),
        (['{"id": "a", "prompt": 3}'], [":1:", "'prompt'", "string"]),
    ],
)
def test_malformed_jsonl_names_file_line_key(tmp_path, lines, expected):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(FileFormatError) as err:
        load_items(p)
    msg = str(err.value)
    assert str(p) in msg
    for part in expected:
        assert part in msg


def test_missing_and_empty_file(tmp_path):
    with pytest.raises(FileFormatError, match="does not exist"):
        load_items(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(FileFormatError, match="empty"):
        load_items(tmp_path / "empty.jsonl")


def test_unreadable_image_raises_file_format_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    item = Item(id="x", prompt="p", image=str(tmp_path / "broken.png"))
    with pytest.raises(FileFormatError, match="not a readable image"):
        item.load_image()


def test_invalid_label_in_constructor():
    with pytest.raises(ValueError, match="label"):
        Item(id="x", prompt="p", label="unsafe")


def test_save_items_round_trip_with_relative_images(tmp_path):
    Image.new("RGB", (4, 4), "blue").save(tmp_path / "a.png")
    items = [
        Item(id="a", prompt="p1", image=str(tmp_path / "a.png"), category="c", label="benign", reference="blue",
                 meta={"k": 1}),
        Item(id="b", prompt="p2"),
    ]
    save_items(items, tmp_path / "out.jsonl")
    first = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert first["image"] == "a.png" and first["k"] == 1
    back = load_items(tmp_path / "out.jsonl")
    assert back == items
