"""Durable storage: spool (append-only segments), lake (Parquet), catalog (DuckDB)."""
