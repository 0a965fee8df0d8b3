"""A reader of MATLAB's MAT-file level 5 format (MATLAB 5 to 7.2, compressed or not), enough for
ImageNet's devkit `meta.mat`: numeric, char, cell and struct arrays. Every install reads it, so that
val labels never depend on an optional package (or on an unchecked id list in its place).

Layout (MathWorks, "MAT-File Format"): a 128-byte header, then data elements, each an 8-byte tag
(type, byte count) or a 4-byte "small element" tag with its data, padded to 8 bytes; a miCOMPRESSED
element holds a zlib stream of further elements; a miMATRIX element holds array flags, dimensions, a
name and the array's data. Arrays come back as Python values: a numeric array as a list in
column-major order (a scalar as a number), a char array as a str, a cell array as a list, a struct
array as a list of {field: value}.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

MI_MATRIX, MI_COMPRESSED = 14, 15
NUMBER_FORMATS = {1: "b", 2: "B", 3: "h", 4: "H", 5: "i", 6: "I", 7: "f", 9: "d", 12: "q", 13: "Q"}
TEXT_ENCODINGS = {16: "utf-8", 17: "utf-16", 18: "utf-32"}
CELL_CLASS, STRUCT_CLASS, CHAR_CLASS = 1, 2, 4
NUMERIC_CLASSES = range(6, 16)  # double, single, int8 ... uint64


class MatFileError(ValueError):
    """Not a MAT-file level 5, or one this reader does not understand (the message says which
    part)."""


def read_mat(source: str | Path | bytes) -> dict[str, Any]:
    """{variable name: value} of a MAT-file level 5 (a path, or its bytes)."""
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
    if len(data) < 128 or data[126:128] not in (b"IM", b"MI"):
        raise MatFileError("not a MAT-file level 5 (MATLAB 5 to 7.2; v7.3 files are HDF5)")
    order = "<" if data[126:128] == b"IM" else ">"
    variables = {}
    for kind, body in _elements(data, 128, order):
        if kind == MI_COMPRESSED:
            kind, body = next(_elements(zlib.decompress(body), 0, order))
        if kind == MI_MATRIX and body:
            name, value = _matrix(body, order)
            variables[name] = value
    return variables


def _elements(data: bytes, offset: int, order: str) -> Any:
    """(type, body) of each data element from `offset` on."""
    while offset + 8 <= len(data):
        kind, size = struct.unpack_from(order + "II", data, offset)
        # the small element format: size in the upper half, the data in the tag's second word
        if kind >> 16:
            kind, size = kind & 0xFFFF, kind >> 16
            yield kind, data[offset + 4: offset + 4 + size]
            offset += 8
            continue
        yield kind, data[offset + 8: offset + 8 + size]
        offset += 8 + (size if kind == MI_COMPRESSED else -(-size // 8) * 8)


def _values(kind: int, body: bytes, order: str) -> list:
    if kind in TEXT_ENCODINGS:
        encoding = TEXT_ENCODINGS[kind]
        return list(
            body.decode(encoding if kind == 16 else encoding + ("-le" if order == "<" else "-be"))
        )
    if kind not in NUMBER_FORMATS:
        raise MatFileError(f"data element of type {kind} where numbers were expected")
    code = NUMBER_FORMATS[kind]
    return list(struct.unpack(f"{order}{len(body) // struct.calcsize(code)}{code}", body))


def _matrix(body: bytes, order: str) -> tuple[str, Any]:
    """(name, value) of one miMATRIX element's body."""
    parts = _elements(body, 0, order)
    flags = _values(*next(parts), order)
    array_class = flags[0] & 0xFF
    dims = _values(*next(parts), order)
    name = bytes(_values(*next(parts), order)).decode("ascii", "replace")
    count = 1
    for side in dims:
        count *= side
    if array_class == STRUCT_CLASS:
        _, width_body = next(parts)
        width = _values(5, width_body, order)[0]
        _, names_body = next(parts)
        fields = [
            names_body[i : i + width].split(b"\0")[0].decode()
            for i in range(0, len(names_body), width)
        ]
        members = [_matrix(body, order)[1] if body else [] for _, body in parts]
        return name, [dict(zip(fields, members[i * len(fields):(i + 1) * len(fields)], strict=True))
                      for i in range(count)]
    if array_class == CELL_CLASS:
        return name, [_matrix(body, order)[1] if body else [] for _, body in parts]
    if array_class == CHAR_CLASS:
        chars = _values(*next(parts), order) if count else []
        chars = [chr(c) if isinstance(c, int) else c for c in chars]
        rows = dims[0] if dims else 1
        if rows <= 1:
            return name, "".join(chars)
        columns = len(chars) // rows  # column-major: row r is every rows-th character from r
        return name, ["".join(chars[r + rows * c] for c in range(columns)) for r in range(rows)]
    if array_class in NUMERIC_CLASSES:
        values = _values(*next(parts), order) if count else []
        return name, values[0] if count == 1 else values
    raise MatFileError(f"array {name!r} of class {array_class}, which this reader does not read")
