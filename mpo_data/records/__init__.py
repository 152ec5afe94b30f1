"""The records every phase reads and writes: line formats and schemas, JSONL and atomic files, images,
validated input readers, resumable sample shards."""
