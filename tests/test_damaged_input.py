"""A night never crashes on its input: every damaged row is repaired and flagged or quarantined with a stable reason
and its raw bytes escaped; no other row is affected; input rows = clean + quarantined."""
import io
import json
import random

import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from jobs.context import RunContext
from jobs.pipeline import run_pipeline
from matcher.config import load_config
from matcher.io.catalog import CatalogError, CatalogReader
from matcher.io.tables import cast_to_table_schema
from tests.reference import clean_catalog

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process

ROWS = 40


def catalog_dir(tmp_path, name="catalog"):
    root = tmp_path / name
    (root / "img").mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (180, 40, 40)).save(buf, format="JPEG")
    (root / "img" / "a.jpg").write_bytes(buf.getvalue())
    return root


def csv_lines(n=ROWS) -> list[bytes]:
    return [f"SKU-{i:04d},Red cotton shirt {i},Soft and light,Shirts,img/a.jpg".encode() for i in range(n)]


def write_csv(root, lines: list[bytes], ending=b"\n") -> None:
    (root / "products.csv").write_bytes(b"product_id,title,description,category,image" + ending
                                        + ending.join(lines) + ending)


def clean_in_process(root):
    cfg = load_config(overrides={"clean": {"image_size": 32}})
    reader = CatalogReader(str(root), cfg.storage)
    raw = reader.read()
    result = clean_catalog(raw, reader.read_image, cfg.clean)
    # Both tables must be storable: cast to the lake schema, and Arrow encodes every string as UTF-8.
    cast_to_table_schema("clean", pa.Table.from_pandas(result.clean, preserve_index=False))
    cast_to_table_schema("quarantine", pa.Table.from_pandas(result.quarantine, preserve_index=False))
    return raw, result


# (damaged title bytes, expected outcome for row 7): ("kept", repairs, truncated) or ("quarantined", reason)
DAMAGE = {
    "invalid utf-8": (b"bad \xff\xfe bytes", ("quarantined", "text_invalid_utf8")),
    "latin-1": (b"Caf\xe9 cr\xe8me mug", ("quarantined", "text_invalid_utf8")),
    "encoded surrogate": (b"x \xed\xa0\x80 y", ("quarantined", "text_invalid_utf8")),
    "nul": (b"nul \x00 inside", ("kept", "control_characters", False)),
    "control characters": (b"bell \x07 esc \x1b", ("kept", "control_characters", False)),
    "bom inside text": (b"\xef\xbb\xbfshirt", ("kept", "control_characters", False)),
    "over the csv field limit": (b"y" * 200_000, ("kept", "", True)),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_one_damaged_title_costs_only_its_row(tmp_path, case):
    title, expected = DAMAGE[case]
    root = catalog_dir(tmp_path)
    lines = csv_lines()
    lines[7] = b"SKU-0007," + title + b",Soft,Shirts,img/a.jpg"
    write_csv(root, lines)
    raw, result = clean_in_process(root)
    assert len(raw.rows) + len(raw.bad_lines) == ROWS
    assert len(result.clean) + len(result.quarantine) == ROWS
    others = {f"SKU-{i:04d}" for i in range(ROWS)} - {"SKU-0007"}
    assert others <= set(result.clean["product_id"])
    if expected[0] == "quarantined":
        row = result.quarantine.set_index("product_id").loc["SKU-0007"]
        assert row["reason"] == expected[1]
        assert "\\x" in row["raw"] and "\\x" in row["detail"]  # the bytes, escaped, not lost
    else:
        row = result.clean.set_index("product_id").loc["SKU-0007"]
        assert row["repairs"] == expected[1] and bool(row["text_truncated"]) is expected[2]
        assert "\x00" not in row["title"] and "\x07" not in row["title"] and "\ufeff" not in row["title"]


def test_a_byte_order_mark_mid_file_and_mixed_line_endings(tmp_path):
    root = catalog_dir(tmp_path)
    lines = csv_lines()
    lines[10] = b"\xef\xbb\xbf" + lines[10]  # a second file's BOM where two exports were concatenated
    body = b"product_id,title,description,category,image\r\n" + b"\r\n".join(lines[:15]) + b"\n" \
        + b"\r".join(lines[15:30]) + b"\r" + b"\n".join(lines[30:]) + b"\n"
    (root / "products.csv").write_bytes(body)
    _, result = clean_in_process(root)
    assert sorted(result.clean["product_id"]) == [f"SKU-{i:04d}" for i in range(ROWS)]
    assert result.clean.set_index("product_id").loc["SKU-0010", "repairs"] == "byte_order_mark"
    assert len(result.quarantine) == 0


@pytest.mark.parametrize("opened, closed", [(2, None), (2, 6), (0, 39)])
def test_a_stray_quote_costs_its_own_line_not_the_records_it_swallowed(tmp_path, opened, closed):
    root = catalog_dir(tmp_path)
    lines = csv_lines()
    lines[opened] = lines[opened].replace(b"Red cotton", b'"Red, cotton')  # a quote opened, never closed there
    if closed is not None:
        lines[closed] = lines[closed].replace(b"shirt", b'shirt 55"')  # a quote in a title: the csv reader's close
    write_csv(root, lines)
    raw, result = clean_in_process(root)
    assert [(b["reason"], b["raw"][:8]) for b in raw.bad_lines] == [("unparseable_line", f"SKU-{opened:04d}")]
    assert sorted(result.clean["product_id"]) == [f"SKU-{i:04d}" for i in range(ROWS) if i != opened]
    if closed is not None and closed != ROWS - 1:
        title = result.clean.set_index("product_id").loc[f"SKU-{closed:04d}", "title"]
        assert title == f'Red cotton shirt 55" {closed}'


@pytest.mark.parametrize("damaged, reason", [(b"SKU-0020,Too,many,fields,img/a.jpg,extra", "wrong_field_count"),
                                             (b"SKU-0020,Too few", None), (b",No id,Soft,Shirts,img/a.jpg", None)])
def test_a_stray_quote_before_a_record_of_another_width_still_costs_only_its_own_line(tmp_path, damaged, reason):
    """The records a stray quote swallowed are read as records are, a damaged one among them (a wrong field count
    or no id had made the quote's whole record one row, every record after it lost with it)."""
    root = catalog_dir(tmp_path)
    lines = csv_lines()
    lines[5] = lines[5].replace(b"Red cotton", b'"Red, cotton')
    lines[20] = damaged
    write_csv(root, lines)
    raw, result = clean_in_process(root)
    assert [b["reason"] for b in raw.bad_lines] == ["unparseable_line"] + ([reason] if reason else [])
    kept = {f"SKU-{i:04d}" for i in range(ROWS) if i != 5 and (i != 20 or damaged.startswith(b"SKU-0020,Too few"))}
    assert kept <= set(result.clean["product_id"]) | set(result.quarantine["product_id"].dropna())
    assert len(result.clean) + len(result.quarantine) == ROWS


@pytest.mark.parametrize("closing", [b'" ,Socks,img/a.jpg', b'"(new),Socks,img/a.jpg'])
def test_a_quoted_description_with_line_breaks_is_one_value_even_when_its_lines_look_like_short_records(tmp_path,
                                                                                                       closing):
    """Lines of sizes ("42, 43") under numeric ids are no records of the header's width: the quote is a value's,
    closed a little off (a space, a word after it), not a stray one."""
    root = catalog_dir(tmp_path)
    lines = [f"{1000 + i},Socks {i},Warm,Socks,img/a.jpg".encode() for i in range(8)]
    lines[3] = b'1003,Socks,"Sizes:\n42, 43\n44, 45\n' + closing
    write_csv(root, lines)
    raw, result = clean_in_process(root)
    assert raw.bad_lines == [] and sorted(result.clean["product_id"]) == [str(1000 + i) for i in range(8)]
    assert result.clean.set_index("product_id").loc["1003", "description"].startswith("Sizes: 42, 43 44, 45")


@pytest.mark.parametrize("opened", [2, 0])  # 0: no record read yet, the open quote's own line gives the ids' shape
def test_a_quote_never_closed_past_the_record_limit_costs_its_own_line_not_the_records_after_it(tmp_path,
                                                                                                  monkeypatch, opened):
    """A quote left open read the rest of the file into one field, up to 1 GiB (a few hundred compressed kilobytes
    held over a gigabyte in the executor): now up to the record limit (made small here), then its line is bad and
    the records it had swallowed, and those after, are read."""
    import matcher.io.catalog as catalog

    monkeypatch.setattr(catalog, "_CSV_FIELD_LIMIT", 800)  # about 13 lines of this catalog
    root = catalog_dir(tmp_path)
    lines = csv_lines()
    lines[opened] = lines[opened].replace(b"Red cotton", b'"Red, cotton')
    write_csv(root, lines)
    raw, result = clean_in_process(root)
    assert [(b["reason"], b["raw"][:8]) for b in raw.bad_lines] == [("unparseable_line", f"SKU-{opened:04d}")]
    assert "field larger than field limit" in raw.bad_lines[0]["detail"]
    assert sorted(result.clean["product_id"]) == [f"SKU-{i:04d}" for i in range(ROWS) if i != opened]


def test_a_csv_line_past_the_record_limit_is_read_past_not_held(tmp_path, monkeypatch):
    """The csv module's field limit came after the text reader had built the whole line: one line of 300 MiB (a
    300 KB gzip) took 720 MiB. A line is now read up to the limit (made small here), its record a bad line."""
    import matcher.io.catalog as catalog

    monkeypatch.setattr(catalog, "MAX_RECORD_CHARS", 500)
    root = catalog_dir(tmp_path)
    lines = csv_lines()
    lines[5] = b"SKU-0005," + b"y" * 5000 + b",Soft,Shirts,img/a.jpg"
    lines[9] = b'SKU-0009,"Red' + b"z" * 5000 + b'",Soft,Shirts,img/a.jpg'  # inside a quoted field too
    write_csv(root, lines)
    raw, result = clean_in_process(root)
    assert [(b["reason"], b["raw"][:8], b["detail"]) for b in raw.bad_lines] == [
        ("unparseable_line", f"SKU-000{i}", f"line {i + 2}: a line over 500 characters, read no further")
        for i in (5, 9)]
    assert len(raw.bad_lines[0]["raw"]) <= 2000
    assert sorted(result.clean["product_id"]) == [f"SKU-{i:04d}" for i in range(ROWS) if i not in (5, 9)]

    # A stray quote before the long line: the records it swallowed, those beyond the long line too, are read
    # (the whole stretch was one bad line, its records neither read nor counted).
    lines[3] = lines[3].replace(b"Red cotton", b'"Red cotton')
    lines[9] = csv_lines()[9].replace(b"Red cotton", b'"Red" cotton')  # the quote closed mid-field, after it
    write_csv(root, lines)
    raw, result = clean_in_process(root)
    assert [(b["raw"][:8], b["detail"][:40]) for b in raw.bad_lines] == [
        ("SKU-0003", "line 5: a quote opened on it is not clos"),
        ("SKU-0005", "line 7: a line over 500 characters, read")]
    assert sorted(result.clean["product_id"]) == [f"SKU-{i:04d}" for i in range(ROWS) if i not in (3, 5)]


def test_a_json_lines_record_past_the_record_limit_is_a_bad_line_read_past(tmp_path, monkeypatch):
    import matcher.io.catalog as catalog

    monkeypatch.setattr(catalog, "MAX_RECORD_CHARS", 1000)
    root = catalog_dir(tmp_path)
    records = [{"product_id": f"SKU-{i}", "title": f"Shirt {i}", "image": "img/a.jpg"} for i in range(5)]
    records[2]["description"] = "x" * 5000  # one record of 5 kB; the reader had no bound on a line
    (root / "products.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    raw, result = clean_in_process(root)
    assert [b["reason"] for b in raw.bad_lines] == ["malformed_json"]
    assert raw.bad_lines[0]["detail"].startswith("a record of 5") and len(raw.bad_lines[0]["raw"]) <= 2000
    assert sorted(result.clean["product_id"]) == ["SKU-0", "SKU-1", "SKU-3", "SKU-4"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_chunk_of_rows_ends_at_its_character_budget_and_no_row_is_lost(tmp_path, monkeypatch, fmt):
    """5,000 records a chunk, each up to the record limit, could be gigabytes at once: a chunk ends at
    CHUNK_CHARS characters too (made small here), and the rows keep their file order across chunks."""
    import matcher.io.catalog as catalog

    monkeypatch.setattr(catalog, "CHUNK_CHARS", 300)
    root = catalog_dir(tmp_path)
    if fmt == "csv":
        write_csv(root, csv_lines())
    else:
        (root / "products.jsonl").write_text("".join(json.dumps(
            {"product_id": f"SKU-{i:04d}", "title": f"Red cotton shirt {i}", "image": "img/a.jpg"}) + "\n"
            for i in range(ROWS)))
    reader = CatalogReader(str(root), load_config().storage)
    plan = reader.plan()
    chunks = [c.rows for split in plan.splits for c in reader.read_split(plan, split)]
    assert len(chunks) >= 5 and all(len(c) < ROWS / 4 for c in chunks)
    rows = pd.concat(chunks, ignore_index=True)
    assert rows["product_id"].tolist() == [f"SKU-{i:04d}" for i in range(ROWS)]
    assert rows["_row"].tolist() == list(range(ROWS))


def test_a_zeroed_block_in_an_early_row_costs_only_that_row(tmp_path):
    root = catalog_dir(tmp_path)
    lines = csv_lines()
    lines[2] = lines[2].replace(b"Red cotton", b"Red " + b"\x00" * 512 + b"cotton")  # a zeroed disk block
    write_csv(root, lines)
    raw, result = clean_in_process(root)
    assert sorted(result.clean["product_id"]) == [f"SKU-{i:04d}" for i in range(ROWS)]
    assert result.clean.set_index("product_id").loc["SKU-0002", "repairs"] == "control_characters"


def test_a_zeroed_block_in_a_file_with_cr_line_endings_costs_only_its_row(tmp_path):
    root = catalog_dir(tmp_path)
    lines = csv_lines()
    lines[2] = lines[2].replace(b"Red cotton", b"Red " + b"\x00" * 512 + b"cotton")
    write_csv(root, lines, ending=b"\r")
    _, result = clean_in_process(root)
    assert sorted(result.clean["product_id"]) == [f"SKU-{i:04d}" for i in range(ROWS)]


def test_utf16_without_its_mark_is_refused_as_binary(tmp_path):
    root = catalog_dir(tmp_path)
    write_csv(root, csv_lines())
    text = (root / "products.csv").read_bytes().decode()
    (root / "products.csv").write_bytes(text.encode("utf-16-le"))
    with pytest.raises(CatalogError, match="looks binary"):
        clean_in_process(root)


def test_blank_lines_before_the_header_are_skipped(tmp_path):
    root = catalog_dir(tmp_path)
    write_csv(root, csv_lines())
    body = (root / "products.csv").read_bytes()
    (root / "products.csv").write_bytes(b"\r\n\n,,,\n" + body)
    raw, result = clean_in_process(root)
    assert raw.bad_lines == [] and sorted(result.clean["product_id"]) == [f"SKU-{i:04d}" for i in range(ROWS)]


@pytest.mark.parametrize("blank", [b"", b",,,,", b"  "])
def test_a_blank_line_among_the_records_a_stray_quote_swallowed_loses_none_of_them(tmp_path, blank):
    root = catalog_dir(tmp_path)
    lines = csv_lines()
    lines[2] = lines[2].replace(b"Red cotton", b'"Red, cotton')  # a quote opened, never closed there
    lines.insert(8, blank)
    write_csv(root, lines)
    raw, result = clean_in_process(root)
    assert [(b["reason"], b["raw"][:8]) for b in raw.bad_lines] == [("unparseable_line", "SKU-0002")]
    assert sorted(result.clean["product_id"]) == [f"SKU-{i:04d}" for i in range(ROWS) if i != 2]


@pytest.mark.parametrize("value", [
    # a line with as many commas as a record, but no id shaped as the catalog's first
    b"Soft and light:\nblue, red, green, white, black\nwash cold",
    # a last line that reads alone as a record with an id shaped as the catalog's: the value's quote ends a field
    b"Specs:\nSKU-0099, red, blue",
])
def test_a_quoted_value_with_line_breaks_stays_one_value(tmp_path, value):
    root = catalog_dir(tmp_path)
    lines = csv_lines()
    lines[5] = b'SKU-0005,Red cotton shirt 5,"' + value + b'",Shirts,img/a.jpg'
    write_csv(root, lines)
    raw, result = clean_in_process(root)
    assert raw.bad_lines == [] and sorted(result.clean["product_id"]) == [f"SKU-{i:04d}" for i in range(ROWS)]
    description = result.clean.set_index("product_id").loc["SKU-0005", "description"]
    assert description == " ".join(value.decode().split())


def test_invisible_characters_around_the_headers_names_are_not_part_of_them(tmp_path):
    root = catalog_dir(tmp_path)
    header = "\ufeff\ufeffproduct_id,title\u200b,description,\u200bcategory,image".encode()  # a BOM saved twice
    (root / "products.csv").write_bytes(header + b"\n" + b"\n".join(csv_lines()) + b"\n")
    _, result = clean_in_process(root)
    assert len(result.clean) == ROWS and result.clean["category"].eq("Shirts").all()


def test_a_control_character_inside_a_product_id_is_quarantined(tmp_path):
    root = catalog_dir(tmp_path)
    lines = csv_lines()
    lines[3] = lines[3].replace(b"SKU-0003", b"SKU-\x000003")
    write_csv(root, lines)
    _, result = clean_in_process(root)
    assert result.quarantine["reason"].tolist() == ["invalid_product_id"]
    assert "U+0000" in result.quarantine["detail"].iloc[0]
    assert len(result.clean) == ROWS - 1


def test_json_lines_damage(tmp_path):
    root = catalog_dir(tmp_path)
    records = [json.dumps({"product_id": f"J{i}", "title": f"Blue mug {i}", "image": "img/a.jpg"}).encode()
               for i in range(10)]
    records[2] = b'{"product_id": "J2", "title": "lone \\ud800 surrogate", "image": "img/a.jpg"}'
    records[3] = b'{"product_id": "J3", "title": "raw \xff byte", "image": "img/a.jpg"}'
    records[4] = b'{"product_id": "J4", "title": "tab\x01ctrl \x00", "image": "img/a.jpg"}'
    records[5] = b'{"product_id": "J5", "title": "stray\rcarriage return", "image": "img/a.jpg"}'
    records[6] = b'{"product_id": "J6", "title": "cut off'
    (root / "products.jsonl").write_bytes(b"\n".join(records) + b"\n")
    _, result = clean_in_process(root)
    reasons = dict(zip(result.quarantine["product_id"], result.quarantine["reason"]))
    assert reasons == {"J2": "text_invalid_utf8", "J3": "text_invalid_utf8", "": "malformed_json"}
    clean = result.clean.set_index("product_id")
    assert set(clean.index) == {"J0", "J1", "J4", "J5", "J7", "J8", "J9"}
    assert clean.loc["J4", "repairs"] == "control_characters" and clean.loc["J5", "title"] == "stray carriage return"


def _mugs(n: int, first: dict | None = None) -> list[dict]:
    records = [{"product_id": f"J{i}", "title": f"Blue mug {i}", "image": "img/a.jpg"} for i in range(n)]
    if first is not None:
        records[0] = first
    return records


@pytest.mark.parametrize("first, first_line, quarantined", [  # J1-J5 are good records in each
    # A first record longer than any header read (a long HTML description): the catalog was refused.
    ({"product_id": "J0", "title": "Mug 0", "description": "long html " * 7000, "image": "img/a.jpg"}, None, {}),
    # An exporter that leaves out empty fields: the first record has no title; the catalog was refused.
    ({"product_id": "J0", "image": "img/a.jpg"}, None, {"J0": "missing_title"}),
    # A damaged first line nested past Python's recursion limit: a crash judged a bug.
    (None, b"[" * 5000, {"": "malformed_json"}),
    # A record that parses but nests past what writing its value back as JSON text can recurse: a crash, at a depth
    # that depended on the stack. Past 64 levels a record is refused wherever it is read.
    (None, b'{"product_id": "J0", "title": "Mug", "image": "img/a.jpg", "tags": ' + b"[" * 900 + b"]" * 900 + b"}",
     {"": "malformed_json"}),
])
def test_a_json_lines_catalog_is_not_judged_by_its_first_record(tmp_path, first, first_line, quarantined):
    root = catalog_dir(tmp_path)
    records = [json.dumps(r).encode() for r in _mugs(6, first)]
    if first_line is not None:
        records[0] = first_line
    (root / "products.jsonl").write_bytes(b"\n".join(records) + b"\n")
    _, result = clean_in_process(root)
    assert dict(zip(result.quarantine["product_id"], result.quarantine["reason"])) == quarantined
    kept = {f"J{i}" for i in range(1, 6)} | ({"J0"} if first is not None and not quarantined else set())
    assert set(result.clean["product_id"]) == kept


def test_a_sparse_json_lines_key_is_read_in_every_chunk(tmp_path):
    root = catalog_dir(tmp_path)
    records = _mugs(5, {"product_id": "J0", "title": "Mug 0", "image": "img/a.jpg", "Sale Price": "9.99"})
    (root / "products.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    reader = CatalogReader(str(root), load_config().storage)
    plan = reader.plan()
    chunks = list(reader.read_split(plan, plan.splits[0], chunk_rows=2))  # the later chunks lack the key
    column = plan.renamed_columns()["Sale Price"]
    assert [list(c.rows[column]) for c in chunks] == [["9.99", ""], ["", ""], [""]]


def _truncated_gzip(root) -> str:
    import gzip

    body = "product_id,title,image\n" + "".join(f"P{i},Lamp {i} of a longer title {i * 7919},img/a.jpg\n"
                                               for i in range(20_000))
    packed = gzip.compress(body.encode())
    (root / "products.csv.gz").write_bytes(packed[: len(packed) * 2 // 3])  # an upload cut short
    return "products.csv.gz after row 10000"


def _damaged_parquet_page(root) -> str:
    import pyarrow.parquet as pq

    path = root / "products.parquet"
    pq.write_table(pa.table({"product_id": [f"P{i}" for i in range(300)], "title": [f"Lamp {i}" for i in range(300)],
                             "image": ["img/a.jpg"] * 300}), path, compression="none", row_group_size=100)
    start = pq.ParquetFile(path).metadata.row_group(1).column(1).data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 16] = b"\xff" * 16  # the page header of row group 1's titles; the footer intact
    path.write_bytes(bytes(data))
    return "products.parquet, row group 1 (from row 100)"


def _truncated_json_lines_gzip(root) -> str:
    import gzip

    noise = random.Random(7)
    body = "".join(json.dumps({"product_id": f"P{i}", "title": f"Lamp {i}", "note": "%0250x" % noise.getrandbits(1000)})
                   + "\n" for i in range(1000))
    packed = gzip.compress(body.encode())
    # Cut past the first 64 KiB but inside the first 1,000 records, which the columns are read from.
    (root / "products.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    return "products.jsonl.gz cannot be decoded"


@pytest.mark.parametrize("damage", [_truncated_gzip, _damaged_parquet_page, _truncated_json_lines_gzip])
def test_a_damaged_catalog_file_is_bad_input_naming_where_not_a_storage_error_to_retry(tmp_path, damage):
    from matcher.failures import classify
    from matcher.io.catalog import CatalogError

    root = catalog_dir(tmp_path)
    where = damage(root)
    with pytest.raises(CatalogError, match="cannot be decoded, it is damaged") as err:
        CatalogReader(str(root), load_config().storage).read()
    assert where in str(err.value)
    assert not classify(err.value).retryable  # it was judged a storage error, retried twice, then failed alike


# Bytes a mutator writes into a row: anything but the CSV's structure (a quote, CR or LF re-cuts records: the
# file's structure is only as good as its quoting) and digits (which could turn one SKU into another's).
_POOL = [b for b in range(256) if b not in b'"\r\n0123456789']
_SPECIAL = [b"\xef\xbb\xbf", b"\x00", b"\xed\xa0\x80", b"\xe9", b"\xff\xfe", b"z" * 150_000, b",", b"\x1b[31m"]


def mutate(line: bytes, rng: random.Random) -> bytes:
    data = bytearray(line)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data) + 1)
        if rng.random() < 0.3:
            piece = rng.choice(_SPECIAL)
        else:
            piece = bytes(rng.choice(_POOL) for _ in range(rng.randint(1, 3)))
        if rng.random() < 0.5 and at < len(data):
            data[at:at + len(piece)] = piece  # overwrite
        else:
            data[at:at] = piece  # insert
    return bytes(data)


def test_random_damage_never_escapes_clean_and_never_costs_an_undamaged_row(tmp_path):
    rng = random.Random(20261128)
    root = catalog_dir(tmp_path)
    n = 24
    for trial in range(200):
        lines = csv_lines(n)
        damaged = set(rng.sample(range(n), rng.randint(1, 6)))
        for i in damaged:
            lines[i] = mutate(lines[i], rng)
        write_csv(root, lines, ending=rng.choice([b"\n", b"\r\n", b"\r"]))
        raw, result = clean_in_process(root)  # no exception may escape
        assert len(raw.rows) + len(raw.bad_lines) == n, trial
        assert len(result.clean) + len(result.quarantine) == n, trial
        kept = set(result.clean["product_id"])
        undamaged = {f"SKU-{i:04d}" for i in range(n) if i not in damaged}
        assert undamaged <= kept, (trial, sorted(undamaged - kept))
        assert result.quarantine["reason"].str.len().min() > 0 if len(result.quarantine) else True


def test_the_clean_stage_on_spark_quarantines_bad_bytes_instead_of_failing_the_night(tmp_path):
    root = catalog_dir(tmp_path)
    lines = csv_lines()
    lines[3] = b"SKU-0003,Caf\xe9 latte mug,Soft,Shirts,img/a.jpg"
    lines[5] = b"SKU-0005," + b"t" * 200_000 + b",Soft,Shirts,img/a.jpg"
    lines[8] = b"SKU-0008,nul \x00 here,Soft,Shirts,img/a.jpg"
    write_csv(root, lines)
    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(root)},
                                 "clean": {"image_size": 32}})
    ctx = RunContext(cfg, "2026-03-01")
    stats = run_pipeline(ctx, ["clean"])["clean"]
    assert (stats["input_rows"], stats["clean_rows"], stats["quarantined_rows"]) == (ROWS, ROWS - 1, 1)
    quarantine = ctx.lake.read_partition("quarantine", ctx.date).to_pandas()
    assert quarantine["reason"].tolist() == ["text_invalid_utf8"] and "Caf\\xe9" in quarantine["raw"].iloc[0]
    clean = ctx.lake.read_partition("clean", ctx.date).to_pandas().set_index("product_id")
    assert clean.loc["SKU-0005", "text_truncated"] and clean.loc["SKU-0008", "repairs"] == "control_characters"


def test_the_clean_stage_on_spark_keeps_awkwardly_named_columns_under_free_names(tmp_path):
    # Before: Spark stopped the night ("Reference `color` is ambiguous") on "color" beside "Color", and on a column
    # named like one of the stage's own.
    from tests.test_clean import AWKWARD_HEADER, AWKWARD_NAMES, awkward_catalog

    root = tmp_path / "catalog"
    root.mkdir()
    awkward_catalog(root)
    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(root)},
                                 "clean": {"image_size": 32}})
    ctx = RunContext(cfg, "2026-03-01")
    stats = run_pipeline(ctx, ["clean"])["clean"]
    assert (stats["input_rows"], stats["clean_rows"], stats["quarantined_rows"]) == (4, 4, 0)
    clean = ctx.lake.read_partition("clean", ctx.date).to_pandas().set_index("product_id")
    assert [clean.loc["P1", name] for name in AWKWARD_NAMES] == [f"{h}-1" for h in AWKWARD_HEADER[3:]]


def test_the_clean_stage_on_spark_and_the_in_process_reference_clean_a_damaged_catalog_alike(tmp_path):
    """The tests above judge damage through tests/reference.clean_catalog, which runs the clean steps in one
    process: the stage wires the same steps across splits and tasks, and must clean and quarantine the same rows
    the same way (every damage at once, a duplicate id whose first row's photo does not read, a photo outside the
    catalog, a stray quote, a line with too many fields)."""
    root = catalog_dir(tmp_path)
    (root / "img" / "broken.jpg").write_bytes(b"not a photo")
    lines = csv_lines(60)
    for row, title in zip(range(3, 60, 6), [damage for damage, _ in DAMAGE.values()]):
        lines[row] = f"SKU-{row:04d},".encode() + title + b",Soft,Shirts,img/a.jpg"
    lines[10] = b"SKU-0011,Wool scarf,Warm,Scarves,img/broken.jpg"  # SKU-0011's first row: its photo does not read
    lines[20] = b"SKU-0020,Outside,Soft,Shirts,../outside.jpg"
    lines[22] = b'SKU-0022,"an unclosed quote,Soft,Shirts,img/a.jpg'
    lines[26] = b"SKU-0026,Too,many,fields,img/a.jpg,extra"
    write_csv(root, lines)

    _, reference = clean_in_process(root)
    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake", "catalog": str(root)},
                                 "clean": {"image_size": 32}, "spark": {"partitions": 3}})
    ctx = RunContext(cfg, "2026-03-01")
    stats = run_pipeline(ctx, ["clean"])["clean"]
    clean = ctx.lake.read_partition("clean", ctx.date).to_pandas()
    quarantine = ctx.lake.read_partition("quarantine", ctx.date).to_pandas()

    def kept(frame: pd.DataFrame) -> list[tuple]:
        return sorted(frame[["product_id", "title", "repairs", "content_hash"]].itertuples(index=False, name=None))

    def refused(frame: pd.DataFrame) -> list[tuple]:
        return sorted(frame[["product_id", "reason", "raw"]].fillna("").itertuples(index=False, name=None))

    assert len(reference.quarantine) >= 7 and stats["input_rows"] == 60
    assert kept(clean) == kept(reference.clean)
    assert refused(quarantine) == refused(reference.quarantine)
