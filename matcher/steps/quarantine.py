"""Every reason a catalog row can be quarantined for, in one place: the clean stage, the catalog reader and the
image readers raise these and nothing else, and docs/running.md's table of reasons is checked against this list
(tests/test_quarantine_reasons.py). A new reason is one entry here and one row there."""
from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """A stable quarantine code (the `reason` column of the quarantine table); the value is what is written."""

    # the row's text or structure
    TEXT_INVALID_UTF8 = "text_invalid_utf8"            # bytes that are not UTF-8 (guessing would change text)
    INVALID_PRODUCT_ID = "invalid_product_id"          # a control character inside, or over 256 characters
    MISSING_PRODUCT_ID = "missing_product_id"
    DUPLICATE_PRODUCT_ID = "duplicate_product_id"      # the first row in file order with a good photo is kept
    MISSING_TITLE = "missing_title"
    WRONG_FIELD_COUNT = "wrong_field_count"            # a CSV record with more fields than the header
    MALFORMED_JSON = "malformed_json"                  # a JSON Lines record that does not parse
    UNPARSEABLE_LINE = "unparseable_line"              # a CSV line the csv module cannot read at all
    # the row's photo
    IMAGE_MISSING = "image_missing"                    # no reference, no such file or object, HTTP 404/410
    IMAGE_EMPTY = "image_empty"
    IMAGE_CORRUPT = "image_corrupt"
    NOT_AN_IMAGE = "not_an_image"
    IMAGE_TOO_LARGE = "image_too_large"                # bytes or pixels over the clean limits
    IMAGE_PATH_ESCAPES_ROOT = "image_path_escapes_root"
    IMAGE_SOURCE_NOT_ALLOWED = "image_source_not_allowed"      # outside the catalog and catalog.image_sources
    IMAGE_ADDRESS_NOT_ALLOWED = "image_address_not_allowed"    # an http(s) photo at a non-public address
    IMAGE_UNSUPPORTED_URI = "image_unsupported_uri"
    IMAGE_UNREADABLE = "image_unreadable"              # the store or server kept failing, other HTTP 4xx
    IMAGE_REFERENCE_INVALID = "image_reference_invalid"        # over 2,048 characters, control characters, a folder,
    #                                                            a malformed s3:// URI, a link loop
