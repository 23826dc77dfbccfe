"""Run database (DuckDB): schema and the single-writer logger."""

from .logger import RunLogger, read_only_query
from .schema import SCHEMA_VERSION, SchemaError, create_schema

__all__ = ["RunLogger", "read_only_query", "SCHEMA_VERSION", "SchemaError", "create_schema"]
