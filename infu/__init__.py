"""InfU core: records, shards, config, face stack, model and the shard-parallel step runner."""

__version__ = "0.1.0"
