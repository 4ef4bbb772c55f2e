import io

import pytest
from PIL import Image

from matcher.config import load_config
from matcher.io.catalog import CatalogError, CatalogReader
from tests.reference import clean_catalog


def jpeg(colour=(200, 30, 30), size=(80, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def messy_catalog(tmp_path):
    """Good rows mixed with every kind of bad row the clean stage must quarantine."""
    root = tmp_path / "catalog"
    (root / "images").mkdir(parents=True)
    (tmp_path / "outside.jpg").write_bytes(jpeg())
    good = []
    for i in range(6):
        (root / "images" / f"g{i}.jpg").write_bytes(jpeg((40 * i, 100, 200)))
        title = f"Good product {i}" if i % 2 else f"好产品 {i} 连衣裙"
        good.append(f'G{i},"{title}",<p>nice &amp; soft</p>,Dresses,images/g{i}.jpg')
    (root / "images" / "empty.jpg").write_bytes(b"")
    (root / "images" / "trunc.jpg").write_bytes(jpeg(size=(400, 400))[:300])
    (root / "images" / "text.jpg").write_bytes(b"this is a text file")
    big = io.BytesIO()
    Image.new("L", (5000, 5000)).save(big, format="PNG")
    (root / "images" / "bomb.png").write_bytes(big.getvalue())
    bad = [
        ',"No id",,Dresses,images/g0.jpg',                       # missing product_id
        'G1,"Duplicate of G1",,Dresses,images/g1.jpg',             # duplicate product_id
        'B2,"",Has a description,Dresses,images/g2.jpg',           # empty title
        'B3,"Missing photo",,Dresses,images/nope.jpg',             # image missing
        'B4,"Zero bytes",,Dresses,images/empty.jpg',               # zero-byte image
        'B5,"Truncated",,Dresses,images/trunc.jpg',                # truncated image
        'B6,"Not an image",,Dresses,images/text.jpg',              # not an image
        'B7,"Bomb",,Dresses,images/bomb.png',                      # absurd dimensions
        'B8,"Escapes root",,Dresses,../outside.jpg',               # path escapes the catalog root
        'B9,"Too,many",fields,here,x,y,z',                         # wrong number of fields
    ]
    body = "\n".join(["product_id,title,description,category,image", *good[:3], *bad[:5], *good[3:], *bad[5:]])
    data = body.encode("utf-8") + "\nB10,\"Bad ".encode() + b"\xff\xfe utf8\",,Dresses,images/g3.jpg\n"
    (root / "products.csv").write_bytes(b"\xef\xbb\xbf" + data)  # with a BOM
    return root


EXPECTED_REASONS = {
    "": "missing_product_id", "B2": "missing_title", "B3": "image_missing", "B4": "image_empty",
    "B5": "image_corrupt", "B6": "not_an_image", "B7": "image_too_large", "B8": "image_path_escapes_root",
    "B10": "text_invalid_utf8",
}


def test_every_bad_row_is_quarantined_and_every_good_row_kept(messy_catalog):
    cfg = load_config(overrides={"clean": {"image_size": 64, "max_image_pixels": 10_000_000}}).clean
    reader = CatalogReader(str(messy_catalog), load_config().storage)
    raw = reader.read()
    result = clean_catalog(raw, reader.read_image, cfg)

    assert sorted(result.clean["product_id"]) == [f"G{i}" for i in range(6)]
    q = result.quarantine
    by_id = dict(zip(q["product_id"], q["reason"]))
    for pid, reason in EXPECTED_REASONS.items():
        assert by_id.get(pid) == reason, (pid, by_id)
    details = dict(zip(q["product_id"], q["detail"]))  # a reason says why in words too
    assert details["B2"] == ("the title is empty (the description is not read as one: map a title column with "
                             "catalog.columns)") and details[""] == "the product_id is empty"
    assert (q["reason"] == "duplicate_product_id").sum() == 1
    assert (q["reason"] == "wrong_field_count").sum() == 1
    # Counts reconcile: every input row is either clean or quarantined.
    input_rows = len(raw.rows) + len(raw.bad_lines)
    assert input_rows == 17
    assert len(result.clean) + len(q) == input_rows
    assert result.stats(input_rows)["quarantined_rows"] == 11

    row = result.clean.set_index("product_id").loc["G0"]
    assert row["title"] == "好产品 0 连衣裙" and row["description"] == "nice & soft"
    assert "连衣裙" in list(row["tokens"])
    assert row["image_width"] == 64 and len(row["content_hash"]) == 64


def test_the_kept_duplicate_is_the_first_occurrence(messy_catalog):
    reader = CatalogReader(str(messy_catalog), load_config().storage)
    result = clean_catalog(reader.read(), reader.read_image, load_config().clean)
    assert result.clean.set_index("product_id").loc["G1", "title"] == "Good product 1"


def test_a_duplicate_id_whose_first_photo_fails_keeps_its_next_good_row(tmp_path):
    from matcher.steps.clean import DUPLICATE_DETAIL

    root = tmp_path / "catalog"
    (root / "images").mkdir(parents=True)
    (root / "images" / "ok.jpg").write_bytes(jpeg())
    (root / "products.csv").write_text("\n".join([
        "product_id,title,description,category,image",
        "D1,First row,,Lamps,images/missing.jpg", "D1,Second row,,Lamps,images/ok.jpg",
        "D1,Third row,,Lamps,images/ok.jpg", "D2,Only row,,Lamps,images/ok.jpg",
        "D2,Its duplicate,,Lamps,images/missing.jpg"]) + "\n", encoding="utf-8")
    reader = CatalogReader(str(root), load_config().storage)
    result = clean_catalog(reader.read(), reader.read_image, load_config().clean)
    assert dict(zip(result.clean["product_id"], result.clean["title"])) == {"D1": "Second row", "D2": "Only row"}
    q = result.quarantine
    assert sorted(zip(q["product_id"], q["reason"], q["detail"].where(q["reason"] == "duplicate_product_id", ""))) \
        == [("D1", "duplicate_product_id", DUPLICATE_DETAIL), ("D1", "image_missing", ""),
            ("D2", "duplicate_product_id", DUPLICATE_DETAIL)]  # a duplicate's photo is never read


def test_a_pass_through_value_past_its_cap_is_cut_and_the_row_says_so(tmp_path):
    """A catalog's other columns went to the clean table whole: a 5 MB `notes` value each row grew it without end."""
    root = tmp_path / "catalog"
    (root / "images").mkdir(parents=True)
    (root / "images" / "ok.jpg").write_bytes(jpeg())
    (root / "products.csv").write_text("product_id,title,image,notes,colour\n"
                                       f"A,Lamp,images/ok.jpg,{'n' * 5000},red\nB,Desk,images/ok.jpg,short,blue\n")
    cfg = load_config(overrides={"clean": {"max_passthrough_chars": 1000}})
    reader = CatalogReader(str(root), cfg.storage)
    clean = clean_catalog(reader.read(), reader.read_image, cfg.clean).clean.set_index("product_id")
    assert clean.loc["A", "notes"] == "n" * 1000 and clean.loc["A", "colour"] == "red"
    assert clean.loc["A", "repairs"] == "passthrough_truncated"
    assert clean.loc["B", "notes"] == "short" and clean.loc["B", "repairs"] == ""


def test_a_product_id_repeated_with_failing_photos_is_given_up_after_a_few(tmp_path):
    """Rows of one id are tried one after another: thousands of them, each photo on a server that times out, held a
    task for hours. After MAX_PHOTO_TRIES_PER_PRODUCT unreadable photos the id's further rows are quarantined unread;
    missing photos fail at once and do not count."""
    import socket

    from matcher.steps.clean import GAVE_UP_DETAIL, MAX_PHOTO_TRIES_PER_PRODUCT

    with socket.socket() as s:  # a port nothing listens on: each photo there is unreadable
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "catalog"
    (root / "images").mkdir(parents=True)
    (root / "images" / "ok.jpg").write_bytes(jpeg())
    rows = [f"R,Row {i},,Lamps,images/missing-{i}.jpg" for i in range(MAX_PHOTO_TRIES_PER_PRODUCT + 3)]
    rows += [f"R,Row {i},,Lamps,http://127.0.0.1:{port}/{i}.jpg" for i in range(MAX_PHOTO_TRIES_PER_PRODUCT + 20)]
    rows += ["R,Good at last,,Lamps,images/ok.jpg", "S,Other,,Lamps,images/ok.jpg"]
    (root / "products.csv").write_text("product_id,title,description,category,image\n" + "\n".join(rows) + "\n")
    cfg = load_config(overrides={"catalog": {"http_retries": 0, "http_allow_networks": ["127.0.0.1/32"]}})
    reader = CatalogReader(str(root), cfg.storage, cfg.catalog)
    reads = []

    def read_image(ref: str) -> bytes:
        reads.append(ref)
        return reader.read_image(ref)

    result = clean_catalog(reader.read(), read_image, cfg.clean)
    assert result.clean["product_id"].tolist() == ["S"]
    reasons = result.quarantine.groupby(["reason", "detail"]).size().to_dict()
    assert reasons[("image_unreadable", GAVE_UP_DETAIL)] == 21
    missing = sum(n for (reason, _), n in reasons.items() if reason == "image_missing")
    assert missing == MAX_PHOTO_TRIES_PER_PRODUCT + 3  # each tried: a missing photo costs no time
    assert len(reads) == missing + MAX_PHOTO_TRIES_PER_PRODUCT + 1  # R's missing, its five unreadable, and S


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"sku,name\n1,shoe\n", "lacks required columns"),
    (b"\x00\x01\x02binary\x00" * 20, "binary"),
])
def test_a_file_that_is_not_a_catalog_fails_at_once(tmp_path, content, message):
    (tmp_path / "products.csv").write_bytes(content)
    with pytest.raises(CatalogError, match=message):
        CatalogReader(str(tmp_path), load_config().storage).read()


def test_no_catalog_file(tmp_path):
    with pytest.raises(CatalogError, match="expected one of"):
        CatalogReader(str(tmp_path), load_config().storage).read()


def test_two_catalog_files_in_one_folder_are_refused_unless_one_is_named(tmp_path):
    (tmp_path / "products.csv").write_text("product_id,title,image\nOLD,stale shirt,a.jpg\n")
    (tmp_path / "products.jsonl").write_text('{"product_id": "NEW", "title": "shirt", "image": "a.jpg"}\n')
    with pytest.raises(CatalogError, match=r"products.csv and products.jsonl are both at .*: name the one to read "
                                           r"with catalog.file"):
        CatalogReader(str(tmp_path), load_config().storage).find_products_file()
    named = load_config(overrides={"catalog": {"file": "products.jsonl"}}).catalog
    assert CatalogReader(str(tmp_path), load_config().storage, named).find_products_file().endswith("products.jsonl")


def _formats_catalog(tmp_path, fmt):
    import json

    import pandas as pd

    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(jpeg((i * 60, 0, 0)))
    rows = [{"product_id": str(i), "title": f"t{i}", "image": f"img/{i}.png", "colour": "red",
             "sizes": ["S", "M"], "price": [3.0, 2.5, 1004.0][i], "in_stock": i != 1} for i in range(3)]
    if fmt == "parquet":
        pd.DataFrame(rows).to_parquet(tmp_path / "products.parquet")
    else:
        lines = [json.dumps(r) for r in rows] + ["{not json"]
        (tmp_path / "products.jsonl").write_text("\n".join(lines), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_parquet_and_json_lines_catalogs(tmp_path, fmt):
    root = _formats_catalog(tmp_path, fmt)
    reader = CatalogReader(str(root), load_config().storage)
    raw = reader.read()
    result = clean_catalog(raw, reader.read_image, load_config().clean)
    assert sorted(result.clean["product_id"]) == ["0", "1", "2"]
    assert list(result.clean["colour"]) == ["red"] * 3  # pass-through column
    assert list(result.clean["sizes"]) == ['["S", "M"]'] * 3  # a list as JSON, whatever the format
    # typed scalars read alike in both formats: a whole number without ".0", booleans as JSON writes them
    assert list(result.clean["price"]) == ["3", "2.5", "1004"]
    assert list(result.clean["in_stock"]) == ["true", "false", "true"]
    assert len(result.quarantine) == (1 if fmt == "jsonl" else 0)


_PLAIN = "product_id,title,category,image\n1,Red kettle,Kettles,img/1.png\n2,\"Drill, 18V\",Tools,img/2.png\n"


def _excel_unicode_text(text: str) -> bytes:
    """Excel's "Unicode Text" export: tab-separated UTF-16 LE with a byte-order mark."""
    rows = [line.split(",", 3) if "Drill" not in line else ["2", "Drill, 18V", "Tools", "img/2.png"]
            for line in text.splitlines()]
    return b"\xff\xfe" + "\r\n".join("\t".join(r) for r in rows).encode("utf-16-le")


@pytest.mark.parametrize("name, data", [
    ("products.csv", _PLAIN.encode()),
    ("products.csv", _PLAIN.replace(",", ";").replace('"Drill; 18V"', '"Drill, 18V"').encode()),
    ("products.csv", _PLAIN.replace(",", "|").replace('"Drill| 18V"', '"Drill, 18V"').encode()),
    ("products.csv", _excel_unicode_text(_PLAIN)),
    ("products.csv", b"\xfe\xff" + _PLAIN.encode("utf-16-be")),
    ("products.csv", _PLAIN.replace("product_id,title,category,image", " Product_ID ,TITLE,Category,Image").encode()),
    ("products.csv", _PLAIN.replace("product_id,title,category,image", "Product ID,Title,Category,Image").encode()),
    ("products.csv", _PLAIN.replace("product_id,title,category,image", "productId,title,category,image").encode()),
    ("products.csv.gz", __import__("gzip").compress(_PLAIN.encode())),
    ("products.jsonl.gz", __import__("gzip").compress(
        b'{"product_id": "1", "title": "Red kettle", "category": "Kettles", "image": "img/1.png"}\n'
        b'{"product_id": "2", "title": "Drill, 18V", "category": "Tools", "image": "img/2.png"}\n')),
], ids=["comma", "semicolon", "pipe", "excel-utf16-tabs", "utf16-be", "header-case", "header-words",
                          "header-camel", "csv-gz", "jsonl-gz"])
def test_catalog_file_variants_read_the_same_rows(tmp_path, name, data):
    (tmp_path / "img").mkdir()
    for i in (1, 2):
        (tmp_path / "img" / f"{i}.png").write_bytes(jpeg((i * 90, 0, 0)))
    (tmp_path / name).write_bytes(data)
    reader = CatalogReader(str(tmp_path), load_config().storage)
    result = clean_catalog(reader.read(), reader.read_image, load_config().clean)
    assert result.clean[["product_id", "title", "category"]].values.tolist() == [
        ["1", "Red kettle", "Kettles"], ["2", "Drill, 18V", "Tools"]]
    assert len(result.quarantine) == 0


def test_a_damaged_utf16_row_costs_only_itself(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "1.png").write_bytes(jpeg())
    good = "product_id,title,image\r\n1,Kettle,img/1.png\r\n".encode("utf-16-le")
    damaged = "2,Dr".encode("utf-16-le") + b"\x00\xdc" + "ill,img/1.png\r\n".encode("utf-16-le")  # a lone surrogate
    (tmp_path / "products.csv").write_bytes(b"\xff\xfe" + good + damaged + "3,Lamp,img/1.png\r\n".encode("utf-16-le"))
    reader = CatalogReader(str(tmp_path), load_config().storage)
    result = clean_catalog(reader.read(), reader.read_image, load_config().clean)
    assert list(result.clean["product_id"]) == ["1", "3"]
    assert result.quarantine[["product_id", "reason"]].values.tolist() == [["2", "text_invalid_utf8"]]


def test_a_header_spelling_closer_to_the_column_wins_over_one_with_other_separators(tmp_path):
    (tmp_path / "products.csv").write_text("Product ID,Product_ID,title,image\nlegacy,1,Kettle,a.jpg\n")
    reader = CatalogReader(str(tmp_path), load_config().storage)
    assert reader.plan().mapping["product_id"] == "Product_ID"


def test_two_columns_naming_title_in_different_cases_are_not_guessed_between(tmp_path):
    (tmp_path / "products.csv").write_text("product_id,Title,TITLE\n1,a,b\n")
    with pytest.raises(CatalogError, match=r"lacks required columns \['title'\]"):
        CatalogReader(str(tmp_path), load_config().storage).read()


def test_column_mapping_and_image_template_read_a_foreign_catalog(tmp_path):
    (tmp_path / "images").mkdir()
    for pid in ("7", "8"):
        (tmp_path / "images" / f"{pid}.jpg").write_bytes(jpeg())
    (tmp_path / "styles.csv").write_text("id,productDisplayName,articleType\n7,Blue Shirt,Shirts\n8,Red Shoe,Shoes\n")
    cfg = load_config(overrides={"catalog": {
        "file": "styles.csv", "image_template": "images/{product_id}.jpg",
        "columns": {"product_id": "id", "title": "productDisplayName", "category": "articleType"}}})
    reader = CatalogReader(str(tmp_path), cfg.storage, cfg.catalog)
    result = clean_catalog(reader.read(), reader.read_image, cfg.clean)
    assert result.clean[["product_id", "title", "category"]].values.tolist() == [
        ["7", "Blue Shirt", "Shirts"], ["8", "Red Shoe", "Shoes"]]


def test_an_id_the_clean_stage_repairs_or_newer_than_pythons_unicode_keeps_its_row(tmp_path):
    """image_template named the photo by the id before its byte-order mark was dropped (image_missing for a photo
    that was there); a character newer than Python's Unicode tables (CJK Extension H) counted as a control."""
    (tmp_path / "images").mkdir()
    for pid in ("SKU2", "SKU-\U00031350"):
        (tmp_path / "images" / f"{pid}.jpg").write_bytes(jpeg())
    (tmp_path / "products.csv").write_text("product_id,title\n\ufeffSKU2,Blue Shirt\nSKU-\U00031350,Red Shoe\n"
                                           "SKU-\u0007,Bell\n", encoding="utf-8")
    cfg = load_config(overrides={"catalog": {"image_template": "images/{product_id}.jpg"}})
    reader = CatalogReader(str(tmp_path), cfg.storage, cfg.catalog)
    result = clean_catalog(reader.read(), reader.read_image, cfg.clean)
    assert sorted(result.clean["product_id"]) == ["SKU-\U00031350", "SKU2"]
    assert result.quarantine["detail"].tolist() == ["control character U+0007 in product_id"]


def test_one_column_may_fill_two_fields_and_two_columns_may_swap(tmp_path):
    (tmp_path / "products.csv").write_text("id,name,pic\n1,Red shirt,a.jpg\n")
    both = load_config(overrides={"catalog": {"columns": {"product_id": "id", "title": "name", "image": "pic",
                                                          "description": "name"}}})
    rows = CatalogReader(str(tmp_path), both.storage, both.catalog).read().rows
    assert rows[["title", "description", "image"]].values.tolist() == [["Red shirt", "Red shirt", "a.jpg"]]
    swap = load_config(overrides={"catalog": {"columns": {"product_id": "id", "title": "pic", "image": "name"}}})
    rows = CatalogReader(str(tmp_path), swap.storage, swap.catalog).read().rows
    assert rows[["title", "image"]].values.tolist() == [["a.jpg", "Red shirt"]]


def test_columns_left_unread_and_look_alikes_of_absent_fields_are_noted_for_the_driver_to_warn(tmp_path):
    """A description or category under another name read as empty without a word; a file's own product_id column
    left out for the one catalog.columns names was dropped silently."""
    (tmp_path / "products.csv").write_text("id,product_id,title,image,product_description,category_name\n"
                                           "1,SKU1,Red shirt,a.jpg,Soft cotton,Shirts\n")
    cfg = load_config(overrides={"catalog": {"columns": {"product_id": "id"}}})
    notes = CatalogReader(str(tmp_path), cfg.storage, cfg.catalog).plan().notes
    assert notes == ("column 'product_id' is not read: catalog.columns maps product_id = 'id' (map it to another "
                     "field to keep it)",
                     "no description column, so every description reads as empty; 'product_description' may be one: "
                     "map it with catalog.columns (description = 'product_description')",
                     "no category column, so every category reads as empty; 'category_name' may be one: map it with "
                     "catalog.columns (category = 'category_name')")
    mapped = load_config(overrides={"catalog": {"columns": {"product_id": "id", "description": "product_description",
                                                            "category": "category_name"}}})
    plan = CatalogReader(str(tmp_path), mapped.storage, mapped.catalog).plan()
    assert len(plan.notes) == 1 and "'product_id' is not read" in plan.notes[0]
    (tmp_path / "products.csv").write_text("product_id,title,image,description,category\n1,Red shirt,a.jpg,,\n")
    assert CatalogReader(str(tmp_path), cfg.storage).plan().notes == ()
    # a look-alike whose name the clean table must respell (a space) is still named
    (tmp_path / "products.csv").write_text("product_id,title,image,Product Description\n1,Red shirt,a.jpg,Soft\n")
    assert CatalogReader(str(tmp_path), cfg.storage).plan().notes == (
        "no description column, so every description reads as empty; 'Product Description' may be one: map it with "
        "catalog.columns (description = 'Product Description')",)


def test_a_catalog_location_naming_the_products_file_says_to_give_its_folder_and_a_sensor_does_not_wait(tmp_path):
    from matcher.io.catalog import CatalogMisconfigured

    (tmp_path / "products.csv").write_text("product_id,title,image\n1,Red shirt,a.jpg\n")
    (tmp_path / "export.csv").write_text("product_id,title,image\n1,Red shirt,a.jpg\n")
    with pytest.raises(CatalogMisconfigured, match=r"products.csv is a file: give its folder \(photo paths are read "
                                                   r"relative to it\)$"):
        CatalogReader(str(tmp_path / "products.csv"), load_config().storage).ready()
    with pytest.raises(CatalogMisconfigured, match=r"export.csv is a file: .* name the file with catalog.file = "
                                                   r"'export.csv'$"):
        CatalogReader(str(tmp_path / "export.csv"), load_config().storage).plan()
    assert not CatalogReader(str(tmp_path / "absent"), load_config().storage).ready()  # not there yet: wait
    (tmp_path / "empty.csv").write_bytes(b"")  # an empty local file is a file too (only S3 has empty "folders")
    with pytest.raises(CatalogMisconfigured, match="empty.csv is a file"):
        CatalogReader(str(tmp_path / "empty.csv"), load_config().storage).ready()


def test_a_protocol_relative_photo_url_is_read_as_https_under_the_same_rules(tmp_path):
    """//cdn/img.jpg, as web pages write photo links: an https URL (it was image_path_escapes_root, "a symlink or
    .."), so catalog.http_images and the address rules decide, as for any URL."""
    from matcher.steps.images import ImageRejected

    for http_images, reason, detail in ((False, "image_source_not_allowed", "catalog.http_images is off"),
                                        (True, "image_address_not_allowed", "a loopback address")):
        cfg = load_config(overrides={"catalog": {"http_images": http_images}})
        with pytest.raises(ImageRejected) as rejected:
            CatalogReader(str(tmp_path), cfg.storage, cfg.catalog).read_image("//127.0.0.1:9/img/1.jpg")
        assert rejected.value.reason == reason and "https://127.0.0.1:9/img/1.jpg" in str(rejected.value)
        assert detail in str(rejected.value)


def test_a_catalog_without_an_image_column_fails_at_once_naming_the_likely_one(tmp_path):
    (tmp_path / "products.csv").write_text("product_id,title,image_url\n1,Red shirt,https://cdn/a.jpg\n")
    cfg = load_config()
    with pytest.raises(CatalogError, match='has no image column.*e.g. image = "image_url"'):
        CatalogReader(str(tmp_path), cfg.storage, cfg.catalog).plan()
    built = load_config(overrides={"catalog": {"image_template": "img/{product_id}.jpg"}})
    assert CatalogReader(str(tmp_path), built.storage, built.catalog).read().rows["image"].tolist() == ["img/1.jpg"]
    (tmp_path / "products.csv").write_text("Artikel;Name;Bild\n1;Rotes Hemd;a.jpg\n")  # not mapped yet
    with pytest.raises(CatalogError, match=r"it has \['Artikel', 'Name', 'Bild'\]"):  # its own split, not one column
        CatalogReader(str(tmp_path), cfg.storage, cfg.catalog).plan()


def test_column_mapping_naming_an_absent_column_is_a_clear_error(tmp_path):
    (tmp_path / "products.csv").write_text("product_id,title,image\n1,a,a.jpg\n")
    cfg = load_config(overrides={"catalog": {"columns": {"title": "productDisplayName"}}})
    with pytest.raises(CatalogError, match="productDisplayName"):
        CatalogReader(str(tmp_path), cfg.storage, cfg.catalog).read()


@pytest.mark.integration
def test_image_references_may_be_s3_and_file_uris(tmp_path, s3_config):
    from matcher.io.storage import resolve_uri, write_bytes

    fs, path = resolve_uri("s3://lake/uri-test/a.jpg", s3_config.storage)
    write_bytes(fs, path, jpeg((10, 200, 10)))
    (tmp_path / "b.jpg").write_bytes(jpeg((10, 10, 200)))
    (tmp_path / "products.csv").write_text(
        "product_id,title,image\n"
        "A,From S3,s3://lake/uri-test/a.jpg\n"
        f"B,From a file URI,file://{tmp_path / 'b.jpg'}\n"
        "C,Missing on S3,s3://lake/uri-test/none.jpg\n"
        "D,Unsupported,ftp://example.invalid/d.jpg\n")
    # An S3 photo outside the catalog root is read only from a prefix the config names (tests/test_hostile_catalog.py).
    cfg = s3_config.with_overrides({"catalog": {"image_sources": ["s3://lake/uri-test/"]}})
    reader = CatalogReader(str(tmp_path), cfg.storage, cfg.catalog)
    result = clean_catalog(reader.read(), reader.read_image, s3_config.clean)
    assert sorted(result.clean["product_id"]) == ["A", "B"]
    assert dict(zip(result.quarantine["product_id"], result.quarantine["reason"])) == {
        "C": "image_missing", "D": "image_unsupported_uri"}


def test_a_record_the_csv_parser_refuses_is_quarantined_and_its_neighbours_kept(tmp_path, monkeypatch):
    """A field past the parser's limit (a fault planted by lowering the limit) costs only its own record."""
    import matcher.io.catalog as catalog

    root = tmp_path / "catalog"
    root.mkdir()
    long_title = "x" * 200
    (root / "products.csv").write_text("product_id,title,image\nA1,Short one,a.jpg\n"
                                       f'A2,"{long_title}",b.jpg\nA3,Another,c.jpg\n', encoding="utf-8")
    monkeypatch.setattr(catalog, "_CSV_FIELD_LIMIT", 100)
    raw = CatalogReader(str(root), load_config().storage).read()
    assert list(raw.rows["product_id"]) == ["A1", "A3"]
    assert [b["reason"] for b in raw.bad_lines] == ["unparseable_line"]
    assert "field larger than field limit" in raw.bad_lines[0]["detail"]


# A catalog's other columns as exports name them, beside matcher's: a space, a dot, a comma, the partition column,
# the stage's own columns and one name in two cases (Spark resolves names without case; Delta Lake refuses the
# characters).
AWKWARD_HEADER = ["product_id", "title", "image", "Product Type", "a.b", "dt", "_row", "Color", "color", "x,y",
                  "reason", "Title"]
AWKWARD_NAMES = ["Product_Type", "a_b", "dt_2", "_row_2", "Color", "color_2", "x_y", "reason_2", "Title_2"]


def awkward_catalog(root) -> None:
    import csv

    (root / "img").mkdir(parents=True)
    (root / "img" / "a.jpg").write_bytes(jpeg())
    with open(root / "products.csv", "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(AWKWARD_HEADER)
        for i in range(4):
            out.writerow([f"P{i}", f"Red lamp {i}", "img/a.jpg", *[f"{name}-{i}" for name in AWKWARD_HEADER[3:]]])


def test_passthrough_names_free_a_name_only_where_it_cannot_stay():
    from matcher.steps.clean import passthrough_names

    assert passthrough_names(["product_id", "title", "brand", "price_eur"]) == {}
    assert passthrough_names(["product_id", "title", "Color", "color", "COLOR"]) == {"color": "color_2",
                                                                                     "COLOR": "COLOR_3"}
    # A renamed column never takes the name of a column after it.
    assert passthrough_names(["a b", "a_b"]) == {"a b": "a_b_2"}
    assert passthrough_names(["DT", "Kind", "content_hash", "tokens"]) == {
        "DT": "DT_2", "Kind": "Kind_2", "content_hash": "content_hash_2", "tokens": "tokens_2"}


def test_a_column_name_with_bytes_that_are_not_utf8_gets_a_name_arrow_can_write(tmp_path):
    from jobs.clean import _parsed_schema

    (tmp_path / "products.csv").write_bytes(b"product_id,title,image,Cat\xe9gorie\nP1,Red shirt,a.jpg,Hemden\n")
    plan = CatalogReader(str(tmp_path), load_config().storage).plan()
    assert plan.renamed_columns() == {"Cat\udce9gorie": "Cat_gorie"}
    assert "Cat_gorie" in _parsed_schema(plan).names  # the stage's schema: a lone surrogate stopped it here


def test_other_columns_spark_or_delta_cannot_hold_as_named_keep_their_values_under_a_free_name(tmp_path):
    awkward_catalog(tmp_path)
    reader = CatalogReader(str(tmp_path), load_config().storage)
    assert reader.plan().renamed_columns() == {"Product Type": "Product_Type", "a.b": "a_b", "dt": "dt_2",
                                               "_row": "_row_2", "color": "color_2", "x,y": "x_y",
                                               "reason": "reason_2", "Title": "Title_2"}
    result = clean_catalog(reader.read(), reader.read_image, load_config(overrides={"clean": {"image_size": 32}}).clean)
    assert sorted(result.clean["product_id"]) == ["P0", "P1", "P2", "P3"] and result.quarantine.empty
    clean = result.clean.set_index("product_id")
    assert list(clean.columns[-len(AWKWARD_NAMES):]) == AWKWARD_NAMES
    for header, name in zip(AWKWARD_HEADER[3:], AWKWARD_NAMES):
        assert clean.loc["P2", name] == f"{header}-2", name
    assert clean.loc["P2", "title"] == "Red lamp 2"  # "Title" passed through beside it, not read as the title


def test_an_id_and_an_image_reference_at_their_length_limits_are_kept_and_one_more_character_is_quarantined(
        tmp_path):
    """running.md: a product id over 256 characters is invalid_product_id; an image reference over 2,048 is
    image_reference_invalid. At the limit both rows are good."""
    root = tmp_path / "catalog"
    deep = root / "p" / ("d" * 200)
    deep.mkdir(parents=True)
    (deep / "x.jpg").write_bytes(jpeg())
    base = "p/" + "d" * 200 + "/x.jpg"
    at_limit = "./" * ((2048 - len(base)) // 2) + base  # the same photo through "./" segments
    assert len(at_limit) == 2048
    rows = [("I" * 256, base), ("J" * 257, base), ("R1", at_limit), ("R2", at_limit + "x")]
    (root / "products.csv").write_text("product_id,title,image\n" + "".join(f"{p},a title,{r}\n" for p, r in rows))
    reader = CatalogReader(str(root), load_config().storage)
    result = clean_catalog(reader.read(), reader.read_image, load_config(overrides={"clean": {"image_size": 32}}).clean)
    reasons = dict(zip(result.quarantine["product_id"], result.quarantine["reason"]))
    assert sorted(result.clean["product_id"]) == sorted(["I" * 256, "R1"]), reasons
    assert reasons == {"J" * 256: "invalid_product_id", "R2": "image_reference_invalid"}  # its id cut to 256
