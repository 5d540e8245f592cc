"""Public ids: the stable id of a catalog image, and the rule a product id must satisfy.

A product id becomes a folder name (``data_dir/<product_id>/``) and the stem of every file derived from it
(``.removed/<id>-<stamp>``, staging folders), on every filesystem a shop may use, and a field in a vector
database. So it is NFC-normalised (composed and decomposed "é" are one product), holds no control or
bidirectional-override characters (ids that look alike but differ), and is at most ``MAX_PRODUCT_ID_BYTES``
bytes of UTF-8, which leaves room under the usual 255-byte file-name limit for every suffix we add.
"""

from __future__ import annotations

import hashlib
import unicodedata

MAX_PRODUCT_ID_BYTES = 180  # 255-byte file names, minus the longest suffix we derive (".removed" stamp, staging)

# Bidirectional formatting characters: they reorder how an id is displayed, so two different ids look the same.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")

PRODUCT_ID_RULE = (
    f"a product id is 1 to {MAX_PRODUCT_ID_BYTES} bytes of UTF-8 (NFC), not starting with '.' and without '/', '\\', "
    "control or bidirectional-override characters, or leading/trailing spaces"
)


class InvalidProductIdError(ValueError):
    """A product id that cannot be used safely; the message states the rule."""

    def __init__(self, product_id: object, reason: str):
        super().__init__(f"invalid product id {product_id!r}: {reason}; {PRODUCT_ID_RULE}")
        self.product_id = product_id
        self.reason = reason


def image_id_for(relative_path: str) -> str:
    """A stable public id of a catalog image: a hash of its POSIX path relative to the catalog root."""
    return hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:16]


def normalize_product_id(product_id: object) -> str:
    """The canonical (NFC) form of ``product_id``, or :class:`InvalidProductIdError` saying why it is refused."""
    if not isinstance(product_id, str):
        raise InvalidProductIdError(product_id, "not a string")
    pid = unicodedata.normalize("NFC", product_id)
    if not pid.strip():
        raise InvalidProductIdError(product_id, "empty")
    if pid != pid.strip():
        raise InvalidProductIdError(product_id, "leading or trailing whitespace")
    if pid in {".", ".."} or pid.startswith("."):
        raise InvalidProductIdError(product_id, "starts with '.'")
    for ch in pid:
        if ch in "/\\":
            raise InvalidProductIdError(product_id, f"contains {ch!r}")
        if ch in _BIDI:
            raise InvalidProductIdError(product_id, f"contains the bidirectional control U+{ord(ch):04X}")
        if unicodedata.category(ch) == "Cc":
            raise InvalidProductIdError(product_id, f"contains the control character U+{ord(ch):04X}")
    size = len(pid.encode("utf-8"))
    if size > MAX_PRODUCT_ID_BYTES:
        raise InvalidProductIdError(product_id, f"{size} bytes of UTF-8")
    return pid


__all__ = [
    "MAX_PRODUCT_ID_BYTES",
    "PRODUCT_ID_RULE",
    "InvalidProductIdError",
    "image_id_for",
    "normalize_product_id",
]
