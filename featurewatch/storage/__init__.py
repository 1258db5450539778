"""Durable storage and what is read from the home: spool (append-only segments), lake
(Parquet on any pyarrow filesystem), catalog (DuckDB) with its macros, the feature
registry, the audit log, the registration inbox, heartbeats, the deployed-application
record, the SAE store and the fleet overview.

May import: config, errors. Never ray, never capture/, analysis/ or anything above.
"""
