"""Writes the Parquet test fixtures with pyarrow (what pandas and HF datasets use):
testdata/parquet/chat.parquet (a `messages` list-of-struct column, snappy),
testdata/parquet/pc_zstd.parquet (prompt/completion/system columns, zstd) and
testdata/parquet/missing.parquet (a row without the completion column's value).

Run: python3 scripts/make_parquet_fixtures.py (needs `pip install pyarrow`)."""
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

out = pathlib.Path(__file__).resolve().parent.parent / "testdata" / "parquet"
out.mkdir(parents=True, exist_ok=True)
msgs = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]
pq.write_table(pa.table({"messages": [msgs]}), out / "chat.parquet", compression="snappy")
pq.write_table(
    pa.table({"system": ["Be terse."], "prompt": ["Capital of France?"], "completion": ["Paris."]}),
    out / "pc_zstd.parquet",
    compression="zstd",
)
pq.write_table(
    pa.table({"prompt": ["Capital of France?", "Capital of Spain?"], "completion": ["Paris.", None]}),
    out / "missing.parquet",
)
print(out)
