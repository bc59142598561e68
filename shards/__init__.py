"""The shard format: sample schema, tar writer with DALI index, manifest, storage I/O and DALI pipelines."""
