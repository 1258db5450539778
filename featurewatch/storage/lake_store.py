"""Where the lake's files live: a local folder or any pyarrow filesystem (S3, GCS, HDFS...).

A `LakeStore` turns paths relative to the lake (`feature_acts/model=m/date=d/hour=h/x.parquet`)
into reads, atomic writes and deletes on its filesystem, and tells DuckDB how to read
them. DuckDB reads a local lake itself; any other filesystem is handed to each catalog
connection as an fsspec view of the same pyarrow filesystem (`register`), under the
`fwlake://` protocol, so the catalog's views, its macros and the analysts' sandbox work
the same whatever the storage (DuckDB's own httpfs extension is not needed).

Credentials for object stores come the way pyarrow takes them: the URI's query
(`s3://bucket/lake?endpoint_override=host:9000&scheme=http`) and the environment
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.arrow import ArrowFSWrapper

from featurewatch.errors import ConfigError

PROTOCOL = "fwlake"  # how catalog views name files on a non-local lake


class _DuckDBView(ArrowFSWrapper):
    """A pyarrow filesystem as DuckDB sees it: `fwlake://<bucket>/<key>`."""

    protocol = PROTOCOL
    cachable = False  # fsspec would keep every instance (and its S3 client) forever

    @classmethod
    def _strip_protocol(cls, path):
        # fsspec's default would read the bucket as a host name and drop it.
        path = path[len(PROTOCOL) + 3 :] if path.startswith(f"{PROTOCOL}://") else path
        return path.rstrip("/")


class LakeStore:
    """The lake at `location`: a folder path, or a pyarrow filesystem URI such as
    `s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http`."""

    def __init__(self, location: str | Path):
        text = str(location)
        self.location = text
        if "://" in text and not text.startswith("file://"):
            try:
                self.fs, root = pafs.FileSystem.from_uri(text)
            except (pa.ArrowException, ValueError, OSError) as err:
                raise ConfigError(f"storage location {text!r} is not usable: {err}") from None
            self.local = False
            self.root = root.rstrip("/")
        else:
            self.fs = pafs.LocalFileSystem()
            self.local = True
            self.root = os.path.abspath(Path(text.removeprefix("file://")).expanduser())

    def __repr__(self) -> str:
        return f"LakeStore({self.location!r})"

    def path(self, rel: str) -> str:
        """The filesystem path of a lake-relative path."""
        return f"{self.root}/{rel}"

    def url(self, rel: str) -> str:
        """How DuckDB names the file (after `register` on its connection)."""
        return self.path(rel) if self.local else f"{PROTOCOL}://{self.path(rel)}"

    def readable_prefixes(self) -> list[str]:
        """What an analyst's sandboxed connection may read: the lake and nothing else."""
        if not self.local:
            return [f"{PROTOCOL}://{self.root}/"]
        return sorted({self.root + "/", os.path.realpath(self.root) + "/"})

    def register(self, con: duckdb.DuckDBPyConnection) -> None:
        """Let `con` read this lake's files (a no-op for a local lake). Connections to one
        catalog file share DuckDB's database, and with it the registration."""
        if self.local or PROTOCOL in con.list_filesystems():
            return
        con.register_filesystem(_DuckDBView(self.fs))

    @contextmanager
    def writing(self, rel: str) -> Iterator[str]:
        """Yield a filesystem path to write `rel` through (with `filesystem=self.fs`);
        the file appears whole at `rel` when the block ends, or not at all.

        A local write goes to a temporary name and is renamed over `rel`. An object
        store needs no such step: an upload becomes visible only once it is complete."""
        final = self.path(rel)
        if not self.local:
            try:
                yield final
            except BaseException:
                # The writer closed the stream on its way out, which completes the upload
                # of a truncated file: take it away again.
                with suppress(OSError):
                    self.fs.delete_file(final)
                raise
            return
        self.fs.create_dir(os.path.dirname(final), recursive=True)
        tmp = os.path.join(os.path.dirname(final), f".{uuid.uuid4().hex[:8]}.tmp")
        try:
            yield tmp
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write_table(self, rel: str, table: pa.Table, **options) -> None:
        """One Parquet file at `rel`, atomically (options go to `pq.write_table`)."""
        with self.writing(rel) as where:
            pq.write_table(table, where, filesystem=self.fs, **options)

    def parquet_file(self, rel: str) -> pq.ParquetFile:
        return pq.ParquetFile(self.fs.open_input_file(self.path(rel)))

    def delete(self, rel: str) -> None:
        """Remove a file; one already gone is not an error."""
        with suppress(FileNotFoundError):
            self.fs.delete_file(self.path(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File


def as_lake_store(lake: LakeStore | str | Path) -> LakeStore:
    """A LakeStore from a store, a folder or a URI (what the storage functions accept)."""
    return lake if isinstance(lake, LakeStore) else LakeStore(lake)
