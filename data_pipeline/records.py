"""TensorFlow-free `tf.train.Example` encoding and TFRecord framing (for Beam workers).

The Beam builder (`data_pipeline.build_pages`) runs its workers without importing TensorFlow:
importing it costs ~7 s per worker process and ~500 MB of memory, which dominated small
DirectRunner runs and multiplies with `--direct_running_mode=multi_processing`. These helpers
write the same records: `encode_example` produces the protobuf wire format of
``tf.train.Example`` (map entries sorted by key; the bytes can differ from TF's serializer in
entry order only, which parsers ignore), and `TFRecordWriter` writes the TFRecord framing
(``uint64 length | masked crc32c(length) | data | masked crc32c(data)``). Both are checked
against TensorFlow in tests/test_build_pages.py.

Files are opened through `apache_beam.io.filesystems.FileSystems` when Beam is installed (so
``gs://`` / ``s3://`` / HDFS paths work on Dataflow, Flink and Spark), else with `open`.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, BinaryIO, Union

import google_crc32c

FeatureValue = Union[Sequence[bytes], Sequence[int], Sequence[float]]


# --------------------------------------------------------------------------- protobuf wire format


def _varint(value: int) -> bytes:
    if value < 0:  # int64 negative values: two's complement on 64 bits, 10 bytes
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(values: Any, kind: str) -> bytes:
    if kind == "bytes":
        body = b"".join(_field(1, bytes(v)) for v in values)
        return _field(1, body)  # Feature.bytes_list = 1
    if kind == "float":
        packed = struct.pack(f"<{len(values)}f", *values)
        return _field(2, _field(1, packed) if values else b"")  # Feature.float_list = 2
    if kind == "int64":
        packed = b"".join(_varint(int(v)) for v in values)
        return _field(3, _field(1, packed) if values else b"")  # Feature.int64_list = 3
    raise ValueError(f"unknown feature kind {kind!r}")


def encode_example(features: Mapping[str, tuple[str, Any]]) -> bytes:
    """Serialized ``tf.train.Example`` from ``{name: (kind, values)}``.

    kind is 'bytes' (values: bytes / str items; str is UTF-8 encoded), 'int64' or 'float'.
    """
    entries = []
    for name in sorted(features):
        kind, values = features[name]
        if kind == "bytes":
            values = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
        entry = _field(1, name.encode("utf-8")) + _field(2, _feature(values, kind))
        entries.append(_field(1, entry))  # Features.feature (map entry) = 1
    return _field(1, b"".join(entries))  # Example.features = 1


# --------------------------------------------------------------------------- TFRecord framing


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def _open(path: str, mode: str) -> BinaryIO:
    try:
        from apache_beam.io.filesystems import FileSystems
    except ImportError:  # pragma: no cover - Beam is in the [data] extra
        return open(path, mode + "b")
    if mode == "w":
        return FileSystems.create(path)
    return FileSystems.open(path)


class TFRecordWriter:
    """Writes framed records to `path` (any Beam filesystem); use as a context manager."""

    def __init__(self, path: str):
        self.path = path
        self._file = _open(path, "w")
        self.bytes_written = 0

    def write(self, record: bytes) -> None:
        framed = frame_record(record)
        self._file.write(framed)
        self.bytes_written += len(framed)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "TFRecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_records(path: str) -> Iterator[bytes]:
    """Yields the records of a TFRecord file, checking both CRCs (TF-free; for tests/tools)."""
    with _open(path, "r") as f:
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise ValueError(f"{path}: truncated record header")
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
                raise ValueError(f"{path}: corrupt record length")
            data = f.read(length)
            crc = f.read(4)
            if len(data) < length or len(crc) < 4:
                raise ValueError(f"{path}: truncated record")
            if struct.unpack("<I", crc)[0] != masked_crc32c(data):
                raise ValueError(f"{path}: record CRC mismatch")
            yield data
