"""WebDataset shards: the tar codec, the index, the writer, the streamed pool and its loader."""
