"""The distributed runtime: model shards, the sharded backbone, Ray actors."""
