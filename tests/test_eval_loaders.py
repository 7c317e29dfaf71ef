"""Loaders for the public benchmark layouts, on small fixtures in each layout."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from vlmsafe.errors import FileFormatError
from vlmsafe.eval import FIGSTEP_PROMPT, load_figstep, load_mm_safetybench, load_vlsafe

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
MMSB = FIXTURES / "mm_safetybench"


# ---- MM-SafetyBench -------------------------------------------------------------------------


def test_mmsb_default_sd_typo():
    items = load_mm_safetybench(MMSB)
    assert [it.id for it in items] == [
        "01-Illegal_Activitiy/SD_TYPO/0",
        "01-Illegal_Activitiy/SD_TYPO/1",
        "08-Political_Lobbying/SD_TYPO/0",
    ]
    first = items[0]
    assert first.prompt.startswith("The bottom of the image shows")  # "Rephrased Question"
    assert first.image == str((MMSB / "imgs/01-Illegal_Activitiy/SD_TYPO/0.jpg").resolve())
    assert first.category == "01-Illegal_Activitiy" and first.label == "harmful"
    assert first.meta["question"] == "How can someone do placeholder activity A?"
    assert first.meta["key_phrase"] == "placeholder activity A"
    assert first.load_image().size == (8, 8)


def test_mmsb_image_types_pair_with_their_question_field():
    items = load_mm_safetybench(MMSB, scenarios=["illegal_activitiy"], image_types=("SD", "TYPO", "TEXT"))
    by_type = {}
    for it in items:
        by_type.setdefault(it.meta["image_type"], []).append(it)
    assert {k: len(v) for k, v in by_type.items()} == {"SD": 2, "TYPO": 2, "TEXT": 2}
    assert by_type["SD"][0].prompt.startswith("The image shows")  # "Rephrased Question(SD)"
    assert by_type["TYPO"][0].prompt.startswith("The bottom of the image")
    assert by_type["TEXT"][0].prompt == "How can someone do placeholder activity A?"
    assert by_type["TEXT"][0].image is None
    assert by_type["SD"][1].image.endswith("01-Illegal_Activitiy/SD/1.jpg")


def test_mmsb_scenario_filter_and_unknown_scenario():
    assert len(load_mm_safetybench(MMSB, scenarios=["08-Political_Lobbying"])) == 1
    with pytest.raises(FileFormatError, match="Nonexistent"):
        load_mm_safetybench(MMSB, scenarios=["Nonexistent"])
    with pytest.raises(ValueError, match="image types"):
        load_mm_safetybench(MMSB, image_types=("SDXL",))


def test_mmsb_accepts_processed_questions_folder_itself():
    assert len(load_mm_safetybench(MMSB / "processed_questions")) == 3


def _copy_mmsb(tmp_path: Path) -> Path:
    dst = tmp_path / "mmsb"
    shutil.copytree(MMSB, dst)
    return dst


def test_mmsb_missing_key_names_file_entry_and_key(tmp_path):
    root = _copy_mmsb(tmp_path)
    f = root / "processed_questions" / "01-Illegal_Activitiy.json"
    data = json.loads(f.read_text())
    del data["1"]["Rephrased Question"]
    f.write_text(json.dumps(data))
    with pytest.raises(FileFormatError) as err:
        load_mm_safetybench(root)
    msg = str(err.value)
    assert str(f) in msg and "entry '1'" in msg and "'Rephrased Question'" in msg and "missing" in msg


def test_mmsb_invalid_json_names_line(tmp_path):
    root = _copy_mmsb(tmp_path)
    f = root / "processed_questions" / "08-Political_Lobbying.json"
    f.write_text('{\n  "0": {"Question": "x",\n}\n')
    with pytest.raises(FileFormatError, match=r"08-Political_Lobbying\.json:3:\d+: invalid JSON"):
        load_mm_safetybench(root)


def test_mmsb_missing_image_and_missing_folder(tmp_path):
    root = _copy_mmsb(tmp_path)
    (root / "imgs/01-Illegal_Activitiy/SD_TYPO/1.jpg").unlink()
    with pytest.raises(FileFormatError, match=r"entry '1'.*SD_TYPO/1\.jpg.*does not exist"):
        load_mm_safetybench(root)
    assert len(load_mm_safetybench(root, check_images=False)) == 3
    with pytest.raises(FileFormatError, match="processed_questions"):
        load_mm_safetybench(tmp_path)


# ---- FigStep / SafeBench --------------------------------------------------------------------

FIG_CSV = FIXTURES / "figstep" / "question" / "safebench.csv"
FIG_IMG = FIXTURES / "figstep" / "images" / "SafeBench"


def test_figstep_rows_to_items():
    items = load_figstep(FIG_CSV, FIG_IMG)
    assert [it.id for it in items] == ["ForbidQI_1_1", "ForbidQI_1_2", "ForbidQI_2_1"]
    second = items[1]
    assert second.prompt == FIGSTEP_PROMPT
    assert second.image == str((FIG_IMG / "query_ForbidQI_1_2_6.png").resolve())
    assert second.category == "Illegal Activity"
    assert second.meta["question"] == "How can someone do placeholder task two, quickly?"  # quoted comma kept
    assert second.meta["instruction"] == "Methods to do placeholder task two, quickly."
    assert [it.id for it in load_figstep(FIG_CSV, FIG_IMG, categories=["Hate Speech"])] == ["ForbidQI_2_1"]


def test_figstep_missing_image_error_and_render_missing(tmp_path):
    with pytest.raises(FileFormatError) as err:
        load_figstep(FIG_CSV, tmp_path / "imgs")
    assert f"{FIG_CSV}:2:" in str(err.value) and "render_missing" in str(err.value)
    items = load_figstep(FIG_CSV, tmp_path / "imgs", render_missing=True, size=96)
    rendered = tmp_path / "imgs" / "query_ForbidQI_2_1_6.png"
    assert rendered.is_file() and items[2].image == str(rendered.resolve())
    im = Image.open(rendered)
    assert im.size == (96, 96)
    assert min(im.convert("L").getdata()) < 100  # text was drawn


@pytest.mark.parametrize(
    "content, expected",
    [
        (
            "dataset,category_id,task_id,question,instruction\nForbidQI,1,1,q,i\n",
            ["bad.csv:1:", "missing column", "category_name"],
        ),
        (
            "dataset,category_id,task_id,category_name,question,instruction\nForbidQI,1,1,Cat,q,i\nForbidQI,1,2,Cat,q\n",
            ["bad.csv:3:", "fields"],
        ),
        (
            "dataset,category_id,task_id,category_name,question,instruction\nForbidQI,1,1,Cat,q,\n",
            ["bad.csv:2:", "'instruction'", "empty"],
        ),
    ],
)
def test_figstep_malformed_csv(tmp_path, content, expected):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(FileFormatError) as err:
        load_figstep(p, tmp_path, render_missing=True, size=32)
    msg = str(err.value)
    assert str(p) in msg
    for part in expected:
        assert part in msg


# ---- VLSafe -----------------------------------------------------------------------------------

VLS = FIXTURES / "vlsafe"


def test_vlsafe_jsonl():
    items = load_vlsafe(VLS / "harmlessness_examine.jsonl", VLS / "coco")
    assert [it.id for it in items] == ["vlsafe-0", "vlsafe-1"]
    assert items[0].prompt.startswith("What placeholder harm")
    assert items[1].image == str((VLS / "coco" / "COCO_train2014_000000000025.jpg").resolve())
    assert items[0].load_image().size == (8, 8) and items[0].label == "harmful"
    assert len(load_vlsafe(VLS / "harmlessness_examine.jsonl", VLS / "coco", limit=1)) == 1


def test_vlsafe_json_list_and_conversation_records(tmp_path):
    recs = [
        {"id": "c1", "image_id": "COCO_train2014_000000000009.jpg",
         "conversations": [{"from": "human", "value": "<image>\nPlaceholder question?"}]},
        {"image": "COCO_train2014_000000000025.jpg", "question": "Another placeholder?"},
    ]
    p = tmp_path / "vlsafe.json"
    p.write_text(json.dumps(recs))
    items = load_vlsafe(p, VLS / "coco")
    assert [(it.id, it.prompt) for it in items] == [
        ("c1", "Placeholder question?"), ("vlsafe-1", "Another placeholder?")
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '{"image_id": "COCO_train2014_000000000009.jpg", "query": "q"}\n{"query": "q2"}\n',
            ["bad.jsonl:2:", "no image key", "image_id"],
        ),
        ('{"image_id": "COCO_train2014_000000000009.jpg"}\n', ["bad.jsonl:1:", "no prompt", "query"]),
        ('{"image_id": "COCO_train2014_000000000009.jpg", "query": "q"}\n{oops\n', ["bad.jsonl:2:", "invalid JSON"]),
        ('{"image_id": "missing.jpg", "query": "q"}\n', ["bad.jsonl:1:", "missing.jpg", "train2017"]),
        (
            '[{"image_id": "COCO_train2014_000000000009.jpg", "query": "q"}, 5]',
            ["bad.jsonl:1:", "entry 1", "JSON object"],
        ),
    ],
)
def test_vlsafe_malformed(tmp_path, text, expected):
    p = tmp_path / "bad.jsonl"
    p.write_text(text)
    with pytest.raises(FileFormatError) as err:
        load_vlsafe(p, VLS / "coco")
    msg = str(err.value)
    assert str(p) in msg
    for part in expected:
        assert part in msg


def test_vlsafe_as_published_is_detected_and_finds_train2017():
    """harmlessness_examine.jsonl as released: image_id + caption + query; images under coco/train2017/."""
    from vlmsafe.eval.loaders import detect_format, load_benchmark

    path = FIXTURES / "vlsafe_published" / "harmlessness_examine.jsonl"
    assert detect_format(path) == "vlsafe"
    items = load_benchmark(path, images=FIXTURES / "vlsafe_published" / "coco")  # the parent of train2017/
    assert [it.image for it in items] == [
        str((FIXTURES / "vlsafe_published" / "coco" / "train2017" / name).resolve())
        for name in ("000000000009.jpg", "000000000025.jpg")
    ]
    assert items[0].meta["caption"] == "A plate of placeholder food on a table." and items[0].label == "harmful"
    same = load_benchmark(path, images=FIXTURES / "vlsafe_published" / "coco" / "train2017")  # train2017/ itself
    assert [it.image for it in same] == [it.image for it in items]


def test_column_oriented_json_is_refused(tmp_path):
    from vlmsafe.data import read_records

    p = tmp_path / "cols.json"
    p.write_text(json.dumps({"image_id": {"0": "a.jpg", "1": "b.jpg"}, "query": {"0": "q0", "1": "q1"}}))
    with pytest.raises(FileFormatError, match=r"column-oriented.*orient='records'"):
        read_records(p)
