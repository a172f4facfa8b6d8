"""Reading corpora and writing/reading token shards."""
