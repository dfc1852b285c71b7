"""Records: the row schema, readers and writers for every layout and file format, format conversion."""

from thresher.data.convert import convert, convert_report, peek_columns, peek_record_columns, summarize
from thresher.data.layouts import LAYOUTS, LLAMA_FACTORY_LAYOUTS
from thresher.data.messages import record_messages, row_messages, system_text, user_text
from thresher.data.readers import (
    DEFAULT_MAX_FIELD_CHARS,
    ON_BAD_RECORD,
    ReadResult,
    default_quarantine_path,
    read_records,
    read_records_report,
    records_to_table,
)
from thresher.data.record import CANONICAL_COLUMNS, RECORD_SCHEMA, Record, record_id
from thresher.data.repair import DEFAULT_REPAIR, REPAIR_PRESETS, REPAIRS, normalize_repair
from thresher.data.sources import FILE_FORMATS
from thresher.data.steps import Concat, Load
from thresher.data.writers import dataset_info_entry, layout_table, write_dataset_info, write_records

__all__ = [
    "CANONICAL_COLUMNS",
    "DEFAULT_MAX_FIELD_CHARS",
    "DEFAULT_REPAIR",
    "FILE_FORMATS",
    "LAYOUTS",
    "LLAMA_FACTORY_LAYOUTS",
    "ON_BAD_RECORD",
    "RECORD_SCHEMA",
    "REPAIRS",
    "REPAIR_PRESETS",
    "Concat",
    "Load",
    "ReadResult",
    "Record",
    "convert",
    "convert_report",
    "dataset_info_entry",
    "default_quarantine_path",
    "layout_table",
    "normalize_repair",
    "peek_columns",
    "peek_record_columns",
    "read_records",
    "read_records_report",
    "record_id",
    "record_messages",
    "records_to_table",
    "row_messages",
    "summarize",
    "system_text",
    "user_text",
    "write_dataset_info",
    "write_records",
]
